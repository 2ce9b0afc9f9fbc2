"""Remote code: the code of a converted model saved beside its weights, so that plain transformers loads it without
t2r (`AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)`): from the Hub, in lm-eval's own CLI, in any
tool that takes a model directory. Loading it runs that code, so it is written only when asked (`--remote-code`,
`t2r.save(..., remote_code=True)`): trusting it is the decision of whoever loads the model.

The bundle is generated from t2r's own source files when the model is saved, never kept as a second copy: the import
closure of the family's adapter and of `adapters.classes` (the attention, feature maps, mixers, ops, cache; not the
other families, the CLI or training), each module copied to one flat file beside the weights (`t2r/ops/delta/chunk.py`
-> `t2r_ops_delta_chunk.py`: transformers' loader copies only the files beside the entry file that it finds through
`from .NAME import ...` lines), t2r's own imports rewritten to those names. An entry file, `modeling_t2r.py`, builds
the family's config and model classes, and `auto_map` in config.json names them. The bundle imports only torch,
transformers, safetensors and the standard library (transformers refuses a file that imports anything not installed).
"""

from __future__ import annotations

import ast
import json
import sys
from pathlib import Path

from .adapters import ADAPTERS
from .adapters.classes import auto_class
from .errors import T2RError
from .io import write_json, write_text

PACKAGE = "t2r"
PACKAGE_DIR = Path(__file__).resolve().parent
ENTRY = "modeling_t2r"
BUNDLE_PREFIX = "t2r_"  # every bundled module's file name starts with it (the entry's does not)
THIRD_PARTY = ("torch", "transformers", "safetensors")  # what the bundle may import besides the standard library
CONFIG = "config.json"


def source_file(module: str) -> Path:
    """The source file of t2r module `module` ("t2r.ops.common"; a package: its __init__.py)."""
    base = PACKAGE_DIR.joinpath(*module.split(".")[1:])
    return base / "__init__.py" if base.is_dir() else base.with_suffix(".py")


def is_module(module: str) -> bool:
    return module.split(".")[0] == PACKAGE and source_file(module).is_file()


def flat_name(module: str) -> str:
    """"t2r.ops.delta.chunk" -> "t2r_ops_delta_chunk": the module's name in the bundle."""
    return module.replace(".", "_")


def _resolve(node: ast.ImportFrom, module: str) -> str:
    """The absolute name of what `node` (in t2r module `module`) imports from."""
    if node.level == 0:
        return node.module or ""
    package = module.split(".") if source_file(module).name == "__init__.py" else module.split(".")[:-1]
    base = package[:len(package) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def _internal_imports(module: str, tree: ast.Module) -> list[tuple[ast.ImportFrom, str]]:
    """Each import of `module` that names a t2r module, with the module it imports from; anything else is refused
    unless the bundle can carry it (torch, transformers, safetensors, the standard library)."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(node, module)
            if target.split(".")[0] == PACKAGE:
                if target == PACKAGE:
                    raise T2RError(f"{module} imports from the t2r package itself: remote code cannot carry it")
                found.append((node, target))
                continue
            names = [target]
        else:
            continue
        for name in names:
            top = name.split(".")[0]
            if top == PACKAGE or (top not in THIRD_PARTY and top not in sys.stdlib_module_names):
                raise T2RError(f"{module} imports {name}, which remote code cannot carry (it may import only "
                               f"{', '.join(THIRD_PARTY)} and the standard library)")
    return found


def dependencies(module: str) -> list[str]:
    """The t2r modules `module` imports (a name imported from a package that is itself a module counts as one)."""
    deps = []
    for node, target in _internal_imports(module, ast.parse(source_file(module).read_text("utf-8"))):
        deps.append(target)
        deps += [f"{target}.{alias.name}" for alias in node.names if is_module(f"{target}.{alias.name}")]
    return deps


def closure(roots: list[str]) -> list[str]:
    """`roots` and every t2r module they import, directly or not, sorted."""
    seen, todo = set(), list(roots)
    while todo:
        module = todo.pop()
        if module not in seen:
            seen.add(module)
            todo += dependencies(module)
    return sorted(seen)


def _rewritten_import(node: ast.ImportFrom, target: str) -> list[str]:
    """`node` as lines of flat relative imports. A submodule imported by name (`from . import learned`) is bound by
    `from . import t2r_..._learned as learned`, after a `from .t2r_..._learned import ...` line that transformers'
    loader can find."""
    names, lines = [], []
    for alias in node.names:
        sub = f"{target}.{alias.name}"
        if is_module(sub):
            lines += [f"from .{flat_name(sub)} import __name__ as _  # noqa",
                      f"from . import {flat_name(sub)} as {alias.asname or alias.name}"]
        else:
            names.append(alias.name + (f" as {alias.asname}" if alias.asname else ""))
    if names:
        lines.insert(0, f"from .{flat_name(target)} import {', '.join(names)}")
    return lines


def bundled_source(module: str) -> str:
    """The source of t2r module `module` with its t2r imports rewritten to the bundle's flat names."""
    text = source_file(module).read_text("utf-8")
    lines = text.splitlines()
    for node, target in sorted(_internal_imports(module, ast.parse(text)), key=lambda x: -x[0].lineno):
        first, last = lines[node.lineno - 1], lines[node.end_lineno - 1]
        indent = first[:node.col_offset]
        if indent.strip() or last[node.end_col_offset:].split("#")[0].strip():
            raise T2RError(f"{module}, line {node.lineno}: an import shares its line with other code")
        lines[node.lineno - 1:node.end_lineno] = [indent + line for line in _rewritten_import(node, target)]
    relative = source_file(module).relative_to(PACKAGE_DIR.parent).as_posix()
    header = f"# Generated by t2r from {relative} for remote code: change t2r, not this file.\n"
    return header + "\n".join(lines) + "\n"


def entry_source(family: str) -> str:
    """modeling_t2r.py: the family's converted config and model classes, built by the bundled t2r code."""
    adapter = ADAPTERS.get(family)
    config_name, model_name = converted_names(family)
    return (f'"""The code of a t2r-converted {family} model, generated by t2r from its own source (the t2r_*.py files '
            f'beside this one), so that\ntransformers loads it without t2r: '
            f'{auto_class(family).__name__}.from_pretrained(DIR, trust_remote_code=True)."""\n\n'
            f"from .{flat_name('t2r.adapters.classes')} import make_classes\n"
            f"from .{flat_name(adapter.__module__)} import {adapter.__name__}  # noqa: F401  (registers the family)\n\n"
            f'{config_name}, {model_name} = make_classes("{family}", __name__)\n')


def converted_names(family: str) -> tuple[str, str]:
    """The class names of the family's converted config and model (as `adapters.classes.make_classes` names them)."""
    classes = ADAPTERS.get(family).families[family]
    return f"T2R{classes.config}", f"T2R{classes.causal_lm}"


def bundle(family: str) -> dict[str, str]:
    """{file name: source} of the remote code of a converted `family` model."""
    roots = ["t2r.adapters.classes", ADAPTERS.get(family).__module__]
    files = {f"{flat_name(m)}.py": bundled_source(m) for m in closure(roots)}
    files[f"{ENTRY}.py"] = entry_source(family)
    return files


def auto_map(family: str) -> dict[str, str]:
    config_name, model_name = converted_names(family)
    return {"AutoConfig": f"{ENTRY}.{config_name}", auto_class(family).__name__: f"{ENTRY}.{model_name}"}


def is_bundle_file(path: Path) -> bool:
    return path.suffix == ".py" and (path.name.startswith(BUNDLE_PREFIX) or path.stem == ENTRY)


def write_remote_code(model_dir: str | Path) -> list[str]:
    """Write the remote code of the converted model saved in `model_dir` beside it (each file atomically, config.json
    with its `auto_map` last; files of an earlier bundle removed). Returns the files written."""
    path = Path(model_dir)
    config = json.loads((path / CONFIG).read_text())
    model_type = str(config.get("model_type", ""))
    if "t2r" not in config or not model_type.startswith("t2r_"):
        raise T2RError(f"{path} does not hold a converted t2r model: no remote code to write for it")
    family = model_type.removeprefix("t2r_")
    files = bundle(family)
    for stale in path.iterdir():
        if is_bundle_file(stale) and stale.name not in files:
            stale.unlink()
    for name, text in files.items():
        write_text(path / name, text)
    write_json(path / CONFIG, {**config, "auto_map": auto_map(family)}, sort_keys=True)
    return sorted(files)


def drop_remote_code(model_dir: str | Path) -> None:
    """Remove code and `auto_map` from a directory just written by `save_pretrained` (they are there only for a model
    that was itself loaded with trust_remote_code): t2r writes code only when asked."""
    path = Path(model_dir)
    for file in path.iterdir():
        if is_bundle_file(file):
            file.unlink()
    config = json.loads((path / CONFIG).read_text())
    if "auto_map" in config:
        del config["auto_map"]
        write_json(path / CONFIG, config, sort_keys=True)

