"""The shape of the code base, checked: small modules with one job, short functions, few parameters (or one config
object), imports at the top, one registry and one atomic writer, and no library code that seeds the global RNG.
These read the source; they run in well under a second."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "t2r"
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60
MAX_PARAMETERS = 10
# The ops keep flash-linear-attention's one signature (the tensors, then the same keywords for every op: key_mask,
# mode, chunk_size, initial_state, output_final_state, eps, plus the op's own): they are exempt from the count.
PARAMETER_EXEMPT = ("ops/",)
# Imported where they are used: optional extras, or heavy and needed by one command only.
LOCAL_IMPORTS_ALLOWED = {"lm_eval", "peft", "matplotlib", "psutil", "torch.utils.tensorboard", "datasets", "rdata",
                         "fcntl", "yaml", "llama_cpp", "onnx", "onnxruntime", "onnxruntime.quantization",
                         "tokenizers", "sacrebleu"}
# `t2r --help` imports neither torch nor transformers (tests/test_cli_usability.py): the commands import what they
# need when they run, and the few modules that describe their flags import the torch-backed part where it is used.
LAZY_IMPORT_MODULES = ("cli/",)
LAZY_IMPORTS = {"recipe.py": {".mixers"}, "stages/recipes.py": {"..feature_maps"}, "train/config.py": {"torch"},
                "ablation.py": {".adapters", ".attention", ".recipe", ".rng"},
                "sources.py": {"torch", "transformers", ".adapters.base", ".adapters.classes", ".persistence"}}  # a refusal comes before torch


def modules() -> list[Path]:
    return sorted(SRC.rglob("*.py"))


def _rel(path: Path) -> str:
    return path.relative_to(SRC).as_posix()


def _functions(tree):
    return [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]


@pytest.mark.parametrize("path", modules(), ids=_rel)
def test_module_is_small(path):
    assert len(path.read_text().splitlines()) <= MAX_MODULE_LINES


@pytest.mark.parametrize("path", modules(), ids=_rel)
def test_functions_are_short_and_take_few_parameters(path):
    tree = ast.parse(path.read_text())
    long = [f"{f.name} ({f.end_lineno - f.lineno + 1} lines)" for f in _functions(tree)
            if f.end_lineno - f.lineno + 1 > MAX_FUNCTION_LINES]
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: {long}"
    if _rel(path).startswith(PARAMETER_EXEMPT):
        return
    many = []
    for f in _functions(tree):
        a = f.args
        params = [x.arg for x in a.posonlyargs + a.args + a.kwonlyargs if x.arg not in ("self", "cls")]
        if len(params) > MAX_PARAMETERS:
            many.append(f"{f.name} ({len(params)})")
    assert not many, f"functions with more than {MAX_PARAMETERS} parameters (group them in a config object): {many}"


@pytest.mark.parametrize("path", modules(), ids=_rel)
def test_imports_are_at_the_top(path):
    if _rel(path).startswith(LAZY_IMPORT_MODULES):
        return
    allowed = LOCAL_IMPORTS_ALLOWED | LAZY_IMPORTS.get(_rel(path), set())
    local = []
    for f in _functions(ast.parse(path.read_text())):
        for node in ast.walk(f):
            if isinstance(node, ast.ImportFrom):
                name = "." * node.level + (node.module or "")
            elif isinstance(node, ast.Import):
                name = node.names[0].name
            else:
                continue
            if not any(name == m or name.startswith(m + ".") for m in allowed):
                local.append(f"{name} (line {node.lineno})")
    assert not local, f"function-local imports of non-optional modules: {local}"


def test_no_parameter_or_command_shadows_a_builtin_or_a_module():
    import builtins

    shadowing = set(dir(builtins)) | {"json", "os", "re", "sys", "time", "copy", "math", "torch"}
    found = []
    for path in modules():
        for f in _functions(ast.parse(path.read_text())):
            a = f.args
            names = [x.arg for x in a.posonlyargs + a.args + a.kwonlyargs]
            found += [f"{_rel(path)}:{f.name}({n})" for n in names if n in shadowing]
            if f.col_offset == 0 and f.name in dir(builtins):
                found.append(f"{_rel(path)}:{f.name}")
    assert not found


def test_one_atomic_writer_and_one_registry():
    """Files are replaced only through t2r.io; names are looked up only through t2r.registry.Registry."""
    for path in modules():
        text = path.read_text()
        if _rel(path) != "io.py":
            # moves of finished things, not writes: an unpacked package tree (kept if another process won the race)
            # and the files of an exported model into the run directory
            assert "os.replace(" not in text or _rel(path) in ("corpora.py", "train/trainer.py"), _rel(path)
            assert "mkstemp(" not in text and "mkdtemp(" not in text, _rel(path)
        if _rel(path) != "registry.py":
            assert "class Registry" not in text, _rel(path)


def test_library_code_never_seeds_the_global_rng():
    """`torch.manual_seed` only inside a `fork_rng` block (the caller's RNG state is restored afterwards)."""
    offenders = []
    for path in modules():
        tree = ast.parse(path.read_text())
        forked = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.With) and "fork_rng" in ast.unparse(node.items[0].context_expr):
                forked |= {id(n) for n in ast.walk(node)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and ast.unparse(node.func) in ("torch.manual_seed", "torch.seed",
                                                                         "random.seed", "np.random.seed"):
                if id(node) not in forked:
                    offenders.append(f"{_rel(path)}:{node.lineno}")
    assert not offenders, offenders
