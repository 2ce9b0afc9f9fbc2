"""Remote code (`t2r.save(..., remote_code=True)`, `--remote-code`): a converted model saved with its code loads in plain
transformers with `trust_remote_code=True`, in a fresh process where importing t2r is impossible, from a local
directory and from the Hub's cache layout (offline), with the same logits and the same greedy tokens; without the flag
nothing is written but what was before."""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import transformers
from conftest import byte_tokenizer, tiny_model
from safetensors.torch import save_file
from test_seq2seq import tiny_seq2seq
from test_t5 import tiny_t5
from transformers.dynamic_module_utils import get_imports, get_relative_import_files

import t2r
import t2r.cli
from t2r.errors import T2RError
from t2r.feature_maps import FEATURE_MAPS
from t2r.mixers import MIXERS
from t2r.remote_code import ENTRY, THIRD_PARTY, bundle

SRC = Path(t2r.__file__).resolve().parents[1]  # the folder holding the t2r package
# The start of every script a fresh process runs here: t2r cannot be imported there (a finder refuses it before any
# other import), and at exit it says what of t2r was imported (nothing).
NO_T2R = textwrap.dedent('''
    import atexit, importlib.abc, json, sys

    class NoT2R(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "t2r" or name.startswith("t2r."):
                raise ImportError(f"this process must not import {name}")

    sys.meta_path.insert(0, NoT2R())

    @atexit.register
    def _no_t2r_was_imported():
        print("T2R MODULES", sorted(name for name in sys.modules if name == "t2r" or name.startswith("t2r.")))
''')
LOADER = NO_T2R + textwrap.dedent('''
    import torch
    import transformers
    from safetensors.torch import load_file

    where, ref_file, spec = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    auto = getattr(transformers, spec["auto"])
    if not spec["trust"]:
        try:
            auto.from_pretrained(where)
        except ValueError as err:
            print("REFUSED", " ".join(str(err).split()))
            sys.exit(0)
        sys.exit("loaded without trust_remote_code")

    def outputs(model, ref):
        with torch.no_grad():
            if "decoder_input_ids" in ref:
                logits = model(input_ids=ref["input_ids"], decoder_input_ids=ref["decoder_input_ids"]).logits
            else:
                logits = model(input_ids=ref["input_ids"]).logits
            tokens = model.generate(ref["input_ids"], max_new_tokens=8, do_sample=False)
        return logits, tokens

    ref = load_file(ref_file)
    model = auto.from_pretrained(where, trust_remote_code=True).eval()
    logits, tokens = outputs(model, ref)
    assert torch.equal(logits, ref["logits"]), float((logits - ref["logits"]).abs().max())
    assert torch.equal(tokens, ref["tokens"]), (tokens, ref["tokens"])
    bundle = type(model).__module__.rsplit(".", 1)[0]
    assert sys.modules[bundle + ".t2r_feature_maps"].FEATURE_MAPS.names() == spec["feature_maps"]
    assert sys.modules[bundle + ".t2r_mixers"].MIXERS.names() == spec["mixers"]
    model.save_pretrained(spec["resave"])  # transformers copies the code with the model
    again = auto.from_pretrained(spec["resave"], trust_remote_code=True).eval()
    assert torch.equal(outputs(again, ref)[0], ref["logits"])
    print("LOADED", type(model).__module__, type(model).__name__)
''')

CASES = {
    "llama-hedgehog-window": ("llama", dict(feature_map="hedgehog", feature_dim=8, mixer="window", window=4)),
    "llama-gla-softmax-layer": ("llama", dict(feature_map="elu", mixer="gla", keep_softmax_layers=(1,))),
    "gpt2-t2r-gated-delta": ("gpt2", dict(feature_map="t2r", feature_dim=8, mixer="gated_delta", window=4)),
    "marian-t2r": ("marian", dict(feature_map="t2r", feature_dim=8)),
    "t5-t2r-softmax-block": ("t5", dict(feature_map="t2r", feature_dim=8, keep_softmax_layers=(1,))),
}
T5_FAMILIES = ("t5", "mt5", "umt5")


def converted(family: str, recipe: dict):
    model = tiny_seq2seq(family) if family == "marian" else tiny_t5(family) if family in T5_FAMILIES else \
        tiny_model(family, vocab_size=len(byte_tokenizer()))
    return t2r.convert(model, **recipe).eval()


def reference(model, path) -> None:
    """The model's logits and greedy tokens on a fixed input, written to `path` (safetensors) for the child."""
    g = torch.Generator().manual_seed(0)
    ref = {"input_ids": torch.randint(3, 40, (2, 11), generator=g)}
    if model.config.is_encoder_decoder:
        ref["decoder_input_ids"] = torch.randint(3, 40, (2, 7), generator=g)
    with torch.no_grad():
        ref["logits"] = model(**ref).logits
        ref["tokens"] = model.generate(ref["input_ids"], max_new_tokens=8, do_sample=False)
    save_file({k: v.contiguous() for k, v in ref.items()}, str(path))


def run_without_t2r(tmp_path, script: str, args: list[str], **env) -> str:
    """Run `script` (NO_T2R first) in a fresh process, offline, with its own modules cache, no PYTHONPATH and stdin
    closed (transformers asks nothing); returns its stdout, after checking that it imported nothing of t2r."""
    path = tmp_path / "script.py"
    path.write_text(script)
    environ = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"),
                   OMP_NUM_THREADS="1", **env)
    done = subprocess.run([sys.executable, str(path), *args], env=environ, cwd=tmp_path, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.splitlines()[-1] == "T2R MODULES []", done.stdout[-500:]
    return done.stdout


def run_loader(tmp_path, where, spec: dict, **env) -> str:
    """LOADER on the model at `where` (a directory or a Hub id) against the reference in tmp_path/ref.safetensors."""
    return run_without_t2r(tmp_path, LOADER, [str(where), str(tmp_path / "ref.safetensors"), json.dumps(spec)], **env)


def spec_of(model, tmp_path, trust: bool = True) -> dict:
    auto = "AutoModelForSeq2SeqLM" if model.config.is_encoder_decoder else "AutoModelForCausalLM"
    return {"auto": auto, "trust": trust, "feature_maps": FEATURE_MAPS.names(), "mixers": MIXERS.names(),
            "resave": str(tmp_path / "resaved")}


@pytest.mark.parametrize("case", CASES)
def test_a_fresh_process_without_t2r_loads_it_with_the_same_logits_and_tokens(tmp_path, case):
    family, recipe = CASES[case]
    model = converted(family, recipe)
    out = t2r.save(model, tmp_path / "rnn", byte_tokenizer(), remote_code=True)
    reference(model, tmp_path / "ref.safetensors")
    stdout = run_loader(tmp_path, out, spec_of(model, tmp_path))
    assert "LOADED transformers_modules.rnn." in stdout and f".{ENTRY} T2R" in stdout
    copied = list((tmp_path / "modules" / "transformers_modules" / "rnn").glob(f"*/{ENTRY}.py"))
    assert copied, "transformers did not copy the code into its modules cache"  # HF_MODULES_CACHE was used
    assert {p.name for p in copied[0].parent.glob("t2r_*.py")} == {p.name for p in out.glob("t2r_*.py")}
    resaved = json.loads((tmp_path / "resaved" / "config.json").read_text())
    assert resaved["auto_map"] == json.loads((out / "config.json").read_text())["auto_map"]


@pytest.mark.slow
@pytest.mark.parametrize("family", ["mistral", "qwen2", "qwen3", "phi3", "olmo2", "gemma3_text", "bart", "mt5", "umt5"])
def test_every_other_family_loads_without_t2r(tmp_path, family):
    """The families the fast cases above leave out (about 7 s each): the same load in a process without t2r."""
    model = tiny_seq2seq(family) if family == "bart" else tiny_t5(family) if family in T5_FAMILIES else \
        tiny_model(family, vocab_size=len(byte_tokenizer()))
    recipe = {} if family in ("bart", *T5_FAMILIES) else {"mixer": "gated_delta", "window": 4}
    model = t2r.convert(model, feature_map="hedgehog", feature_dim=8, **recipe).eval()
    out = t2r.save(model, tmp_path / "rnn", remote_code=True)
    reference(model, tmp_path / "ref.safetensors")
    assert "LOADED transformers_modules.rnn." in run_loader(tmp_path, out, spec_of(model, tmp_path))


def hub_snapshot(model_dir, cache, repo: str = "someone/tiny-rnn"):
    """`model_dir` laid out as a model downloaded from the Hub into `cache` (refs/main -> a snapshot)."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    root = cache / ("models--" + repo.replace("/", "--"))
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(commit)
    shutil.copytree(model_dir, root / "snapshots" / commit)
    return repo


def test_loads_from_the_hub_cache_offline_without_t2r(tmp_path):
    """As after `push_to_hub` and a download: transformers fetches each file of the code by name from the repository
    (its own path for Hub models, which checks each file's imports)."""
    model = converted(*CASES["llama-hedgehog-window"])
    out = t2r.save(model, tmp_path / "rnn", byte_tokenizer(), remote_code=True)
    reference(model, tmp_path / "ref.safetensors")
    repo = hub_snapshot(out, tmp_path / "hub")
    stdout = run_loader(tmp_path, repo, spec_of(model, tmp_path), HF_HUB_CACHE=str(tmp_path / "hub"))
    assert "LOADED transformers_modules.someone.tiny_hyphen_rnn." in stdout


def test_without_trust_remote_code_transformers_refuses(tmp_path):
    model = converted(*CASES["llama-hedgehog-window"])
    out = t2r.save(model, tmp_path / "rnn", remote_code=True)
    stdout = run_loader(tmp_path, out, spec_of(model, tmp_path, trust=False))
    # transformers first asks on stdout; stdin is closed, so the answer is no, and it raises
    assert "REFUSED" in stdout and "trust_remote_code=True" in stdout.split("REFUSED", 1)[1]


def test_without_the_flag_the_saved_files_are_as_before(tmp_path):
    """No code and no auto_map; config.json differs from a remote-code save only by its auto_map, the weights not
    at all."""
    model = converted(*CASES["llama-hedgehog-window"])
    plain = t2r.save(model, tmp_path / "plain", byte_tokenizer())
    coded = t2r.save(model, tmp_path / "coded", byte_tokenizer(), remote_code=True)
    assert not list(plain.glob("*.py"))
    config, coded_config = (json.loads((d / "config.json").read_text()) for d in (plain, coded))
    assert "auto_map" not in config
    assert coded_config.pop("auto_map") == {"AutoConfig": f"{ENTRY}.T2RLlamaConfig",
                                            "AutoModelForCausalLM": f"{ENTRY}.T2RLlamaForCausalLM"}
    assert coded_config == config
    assert (plain / "model.safetensors").read_bytes() == (coded / "model.safetensors").read_bytes()
    assert {p.name for p in plain.iterdir()} == {p.name for p in coded.iterdir() if p.suffix != ".py"}


def test_t2r_loads_a_remote_code_directory_with_its_own_classes_and_saves_it_without_code(tmp_path):
    """With t2r imported its registered classes win (trust_remote_code or not); saved again without the flag, or by
    HF's save_pretrained, the model carries no code and no auto_map pointing at files that are not there."""
    model = converted(*CASES["llama-hedgehog-window"])
    out = t2r.save(model, tmp_path / "rnn", remote_code=True)
    ids = torch.tensor([[1, 5, 9, 30, 44]])
    for loaded in (t2r.load(out), transformers.AutoModelForCausalLM.from_pretrained(out),
                   transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)):
        assert type(loaded).__module__ == "t2r.adapters.classes"
        with torch.no_grad():
            assert torch.equal(loaded(ids).logits, model(ids).logits)
    again = t2r.save(t2r.load(out), tmp_path / "again")
    assert not list(again.glob("*.py")) and "auto_map" not in json.loads((again / "config.json").read_text())
    transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).save_pretrained(tmp_path / "hf")
    assert not list((tmp_path / "hf").glob("*.py"))  # nor HF's own save_pretrained (push_to_hub)
    assert "auto_map" not in json.loads((tmp_path / "hf" / "config.json").read_text())


def without_imports(text: str) -> str:
    """The code of a module with every import statement left out (at any depth)."""
    tree = ast.parse(text)
    for node in ast.walk(tree):
        for field in ("body", "orelse", "finalbody"):
            if isinstance(getattr(node, field, None), list):
                setattr(node, field, [n for n in getattr(node, field) if not isinstance(n, (ast.Import, ast.ImportFrom))])
    return ast.dump(tree)


@pytest.mark.parametrize("family", ["llama", "gpt2", "marian", "t5"])
def test_the_bundle_is_t2r_s_own_source_with_only_its_imports_rewritten(family):
    """Each bundled file is a t2r module with only its imports rewritten (one source of truth); the closure holds the
    family's adapter, the attention, maps, mixers, ops and cache, and leaves out the other families, training, the
    CLI."""
    files = bundle(family)
    for name, text in files.items():
        if name == f"{ENTRY}.py":
            continue
        source = SRC / text.split("\n", 1)[0].removeprefix("# Generated by t2r from ").split(" ")[0]
        assert without_imports(text) == without_imports(source.read_text()), name
    assert {"t2r_adapters_classes.py", "t2r_adapters_cache.py", "t2r_attention.py", "t2r_ops.py",
            "t2r_feature_maps_learned.py", "t2r_mixers_delta.py"} <= set(files)
    assert not {"t2r_adapters.py", "t2r_convert.py", "t2r_persistence.py", "t2r_train.py", "t2r_lazy.py"} & set(files)
    left_out = {"llama": "t2r_adapters_gpt2.py", "gpt2": "t2r_adapters_llama.py", "marian": "t2r_adapters_t5.py",
                "t5": "t2r_adapters_gpt2.py"}
    assert left_out[family] not in files


def test_the_bundle_on_disk_is_what_transformers_copies_and_imports_nothing_else(tmp_path):
    out = t2r.save(converted(*CASES["gpt2-t2r-gated-delta"]), tmp_path / "rnn", remote_code=True)
    entry = out / f"{ENTRY}.py"
    reachable = {os.path.basename(f) for f in get_relative_import_files(str(entry))}
    assert reachable | {entry.name} == {p.name for p in out.glob("*.py")}
    for file in out.glob("*.py"):
        assert set(get_imports(str(file))) <= set(THIRD_PARTY) | sys.stdlib_module_names, file.name


def test_a_plain_model_has_no_remote_code_to_write(tmp_path):
    with pytest.raises(T2RError, match="not hold a converted t2r model"):
        t2r.save(tiny_model("llama"), tmp_path / "plain", remote_code=True)
    assert not (tmp_path / "plain").exists()


@pytest.mark.parametrize("flags", [[], ["--remote-code"]])
def test_convert_writes_code_only_with_remote_code(tmp_path, tiny_model_dir, capsys, flags):
    out = tmp_path / "rnn"
    code = t2r.cli.main(["-q", "convert", str(tiny_model_dir), "--out", str(out), "--feature-map", "t2r",
                         "--feature-dim", "8", *flags])
    assert code == 0, capsys.readouterr().err
    config = json.loads((out / "config.json").read_text())
    assert (out / f"{ENTRY}.py").is_file() is bool(flags)
    assert ("auto_map" in config) is bool(flags)


def test_distill_and_finetune_write_the_final_model_s_code(tmp_path, tiny_converted_dir, capsys):
    """`t2r distill --remote-code` (likewise finetune) leaves the run directory loadable without t2r."""
    text = tmp_path / "corpus.txt"
    text.write_text("It is a truth universally acknowledged, that a single man in possession of a good fortune. " * 30)
    runs = {}
    for command, model in (("distill", tiny_converted_dir), ("finetune", tmp_path / "distill")):
        runs[command] = tmp_path / command
        code = t2r.cli.main(["-q", command, str(model), "--data", str(text), "--block-size", "64", "--tokens", "128",
                             "--eval-blocks", "1", "--no-progress", "--out", str(runs[command]), "--remote-code"])
        assert code == 0, capsys.readouterr().err
        assert (runs[command] / f"{ENTRY}.py").is_file(), command
    model = t2r.load(runs["finetune"])
    reference(model, tmp_path / "ref.safetensors")
    stdout = run_loader(tmp_path, runs["finetune"], spec_of(model, tmp_path))
    assert "LOADED transformers_modules.finetune." in stdout


def test_remote_code_of_a_plain_model_is_refused_before_training(tmp_path, tiny_model_dir, capsys):
    text = tmp_path / "corpus.txt"
    text.write_text("plain text " * 200)
    code = t2r.cli.main(["finetune", str(tiny_model_dir), "--data", str(text), "--block-size", "64", "--tokens", "128",
                         "--no-progress", "--out", str(tmp_path / "ft"), "--remote-code"])
    err = capsys.readouterr().err
    assert code == 2 and err.strip().splitlines()[-1].startswith("t2r finetune: error: --remote-code writes the code")
    assert not (tmp_path / "ft" / "config.json").exists()


def test_pipeline_writes_the_final_model_s_code(tmp_path, tiny_model_dir, capsys):
    """`t2r pipeline --remote-code`: the final model's; a training stage's `remote_code: true` its own."""
    (tmp_path / "text.txt").write_text("It is a truth universally acknowledged, that a single man. " * 40)
    recipe = {"name": "tiny", "model": str(tiny_model_dir), "data": str(tmp_path / "text.txt"), "block_size": 64,
              "convert": {"feature_map": "hedgehog", "feature_dim": 8, "window": 4},
              "distill": {"steps": 1, "eval_every": 0, "remote_code": True},
              "eval": {"data": [str(tmp_path / "text.txt")], "context": 64, "max_blocks": 1},
              "generate": {"prompt": "It is", "max_new_tokens": 2}}
    (tmp_path / "tiny.json").write_text(json.dumps(recipe))  # YAML's superset
    runs = {"key": (tmp_path / "run1", []), "flag": (tmp_path / "run2", ["--distill.remote_code", "false", "--remote-code"]),
            "neither": (tmp_path / "run3", ["--distill.remote_code", "false"])}
    for how, (out, flags) in runs.items():
        code = t2r.cli.main(["pipeline", "--config", str(tmp_path / "tiny.json"), "--out", str(out), "--json", *flags])
        assert code == 0, capsys.readouterr().err
        results = json.loads(capsys.readouterr().out)
        assert ("remote_code" in results) is (how == "flag")
        config = json.loads((out / "distill" / "config.json").read_text())
        if how == "neither":
            assert "auto_map" not in config and not list(out.glob("*/*.py"))
        else:
            assert config["auto_map"]["AutoModelForCausalLM"] == f"{ENTRY}.T2RLlamaForCausalLM"
            assert not list((out / "converted").glob("*.py"))


LM_EVAL_TASK = """task: local_text
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
output_type: loglikelihood_rolling
test_split: test
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
metadata:
  version: 1.0
"""
LM_EVAL_CLI = NO_T2R + "from lm_eval.__main__ import cli_evaluate\nsys.argv[0] = 'lm_eval'\ncli_evaluate()\n"


def test_lm_evals_own_command_line_loads_it_without_t2r(tmp_path):
    """`lm_eval --model hf --model_args pretrained=DIR,trust_remote_code=True` (lm-eval's own CLI, in a process that
    cannot import t2r) on a local text: the word perplexity of `t2r eval --text` on the same text."""
    pytest.importorskip("lm_eval", reason="lm-evaluation-harness is not installed (pip install 't2r[lm-eval]')")
    from t2r.cli.evaluation import EvalOptions, eval_command

    out = t2r.save(converted(*CASES["llama-hedgehog-window"]), tmp_path / "rnn", byte_tokenizer(), remote_code=True)
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": t}) + "\n" for t in (
        "It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in want "
        "of a wife.", "However little known the feelings or views of such a man may be.")))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "local_text.yaml").write_text(LM_EVAL_TASK.format(data=docs))
    run_without_t2r(tmp_path, LM_EVAL_CLI, [
        "--model", "hf", "--model_args", f"pretrained={out},trust_remote_code=True,max_length=32,dtype=float32",
        "--tasks", "local_text", "--include_path", str(tmp_path / "tasks"), "--device", "cpu", "--batch_size", "1",
        "--output_path", str(tmp_path / "results")])
    [results] = (tmp_path / "results").rglob("results_*.json")
    theirs = json.loads(results.read_text())["results"]["local_text"]["word_perplexity,none"]
    ours = eval_command(str(out), text=str(docs), context="32", options=EvalOptions(teacher=False))["student"]
    assert abs(theirs - ours["word_perplexity"]) <= 1e-3 * ours["word_perplexity"]
