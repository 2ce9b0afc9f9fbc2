"""Saving and loading converted models (safetensors + JSON only, atomic, reloadable in a fresh process) and where
models come from (`t2r.sources`): every bad path or damaged file must end in a T2RError that says what to do."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap

import pytest
import torch
import transformers
from safetensors.torch import load_file

import t2r
from conftest import tiny_model
from t2r.errors import ModelSourceError, NotAT2RModelError, T2RError
from t2r.sources import load_model, resolve

IDS = torch.tensor([[5, 17, 42, 99, 3, 250, 7, 128, 64, 1, 200, 33]])  # fixed ids, < every tiny vocab (259)

# (family, convert kwargs): the tiny_converted_dir recipe (window + a kept softmax layer) and a pure linear one
RECIPES = {
    "llama-window-kept": ("llama", dict(feature_map="t2r", feature_dim=8, window=4, keep_softmax_layers=(1,))),
    "gpt2-linear": ("gpt2", dict(feature_map="performer", feature_dim=16)),
    "mistral-hedgehog": ("mistral", dict(feature_map="hedgehog", feature_dim=8)),
    "qwen2-taylor-window": ("qwen2", dict(feature_map="taylor", feature_dim=4, window=3)),
}
FAMILY_CLASS = {"llama": transformers.LlamaForCausalLM, "gpt2": transformers.GPT2LMHeadModel,
                "mistral": transformers.MistralForCausalLM, "qwen2": transformers.Qwen2ForCausalLM}


def converted_model(name: str, vocab_size: int):
    """A converted tiny model whose added weights are perturbed away from their initial values, so that a loader
    that re-initialises them instead of reading them from disk gives different logits."""
    family, kwargs = RECIPES[name]
    model = t2r.convert(tiny_model(family, vocab_size=vocab_size), **kwargs)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, tensor in [*model.named_parameters(), *model.named_buffers()]:
            if ".feature_map." in n or n.endswith("window_logit"):
                tensor.add_(0.1 * torch.randn(tensor.shape, generator=gen))
    return model.eval()


def logits_of(model, ids=IDS) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=ids).logits.float()


def entries(path) -> set[str]:
    return {p.name for p in path.iterdir()}


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tokenizer):
    """{recipe name: (directory, logits of the model that was saved)}."""
    out = {}
    for name in RECIPES:
        model = converted_model(name, len(tokenizer))
        path = tmp_path_factory.mktemp("saved") / name
        t2r.save(model, path, tokenizer)
        out[name] = (path, logits_of(model))
    return out


def damaged_copy(src, dst, damage):
    shutil.copytree(src, dst)
    damage(dst / "model.safetensors")
    return dst


def _truncate(f):
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])


def _garbage_header(f):
    data = f.read_bytes()
    f.write_bytes(b"\xff" * 64 + data[64:])


def _rewrite_header(f, header: bytes):
    """Replace the JSON header by `header`, padded to the same length (so the file size still adds up)."""
    data = f.read_bytes()
    n = int.from_bytes(data[:8], "little")
    assert len(header) <= n
    f.write_bytes(data[:8] + header.ljust(n, b" ") + data[8 + n:])


def _header(f) -> dict:
    data = f.read_bytes()
    return json.loads(data[8:8 + int.from_bytes(data[:8], "little")])


def _not_json_header(f):
    _rewrite_header(f, b"this is not json")


def _json_list_header(f):
    _rewrite_header(f, b"[1, 2, 3]")


def _unknown_dtype_header(f):
    header = _header(f)
    name = next(k for k in header if k != "__metadata__")
    header[name]["dtype"] = "Q9"
    _rewrite_header(f, json.dumps(header, separators=(",", ":")).encode())


def _empty_file(f):
    f.write_bytes(b"")


# ---------------------------------------------------------------------------------------------------------- save


def test_save_writes_only_safetensors_and_json(saved):
    for path, _ in saved.values():
        files = [p for p in path.rglob("*") if p.is_file()]
        assert any(p.suffix == ".safetensors" for p in files)
        assert (path / "config.json").is_file()
        assert not [p for p in files if p.suffix in (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")]
        assert {p.suffix for p in files} <= {".safetensors", ".json", ".jinja"}, files


@pytest.mark.parametrize("name", RECIPES)
def test_loaded_model_is_the_family_class_with_the_recipe(saved, name):
    family, kwargs = RECIPES[name]
    path, expected = saved[name]
    model = t2r.load(path)
    assert isinstance(model, FAMILY_CLASS[family])
    assert not model.training
    recipe = model.config.t2r
    assert recipe["feature_map"] == kwargs["feature_map"]
    assert recipe["feature_dim"] == kwargs["feature_dim"]
    assert recipe["window"] == kwargs.get("window", 0)
    assert recipe["keep_softmax_layers"] == list(kwargs.get("keep_softmax_layers", ()))
    assert t2r.Recipe.from_dict(recipe).feature_map == kwargs["feature_map"]
    torch.testing.assert_close(logits_of(model), expected, rtol=0, atol=1e-6)


LOADERS = ("auto", "t2r.load")

# One fresh process loads every saved model both ways ("auto" first, so nothing t2r.load does can help it) and
# writes the logits of each to a safetensors file: one interpreter start-up instead of four.
LOAD_SCRIPT = textwrap.dedent("""
    import json, sys
    import torch
    from safetensors.torch import save_file
    import t2r
    from transformers import AutoModelForCausalLM
    jobs, out = json.loads(sys.argv[1]), sys.argv[2]
    ids = torch.tensor([json.loads(sys.argv[3])])
    logits, classes = {}, {}
    for loader in ("auto", "t2r.load"):
        for name, path in jobs.items():
            model = AutoModelForCausalLM.from_pretrained(path).eval() if loader == "auto" else t2r.load(path)
            with torch.inference_mode():
                logits[f"{name}/{loader}"] = model(input_ids=ids).logits.float().contiguous()
            classes[f"{name}/{loader}"] = [cls.__name__ for cls in type(model).__mro__]
    save_file(logits, out)
    print(json.dumps(classes))
""")


@pytest.fixture(scope="module")
def reloaded(saved, tmp_path_factory):
    """{"<recipe>/<loader>": (logits, class names of the loaded model)}, computed in a new Python process."""
    out = tmp_path_factory.mktemp("reloaded") / "logits.safetensors"
    jobs = json.dumps({name: str(path) for name, (path, _) in saved.items()})
    proc = subprocess.run([sys.executable, "-c", LOAD_SCRIPT, jobs, str(out), json.dumps(IDS[0].tolist())],
                          capture_output=True, text=True, cwd=out.parent, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    classes = json.loads(proc.stdout.strip().splitlines()[-1])
    logits = load_file(str(out))
    return {key: (logits[key], classes[key]) for key in classes}


@pytest.mark.parametrize("loader", LOADERS)
@pytest.mark.parametrize("name", RECIPES)
def test_reload_in_a_new_process_gives_the_same_logits(saved, reloaded, name, loader):
    _, expected = saved[name]
    logits, classes = reloaded[f"{name}/{loader}"]
    assert FAMILY_CLASS[RECIPES[name][0]].__name__ in classes
    assert logits.shape == expected.shape
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-6)


def test_save_refuses_to_overwrite_without_flag(tmp_path, tokenizer):
    out = tmp_path / "rnn"
    t2r.save(converted_model("llama-window-kept", len(tokenizer)), out, tokenizer)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(T2RError, match="already exists.*--overwrite"):
        t2r.save(converted_model("llama-window-kept", len(tokenizer)), out, tokenizer)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert entries(tmp_path) == {"rnn"}


def test_save_overwrite_replaces_a_t2r_model(tmp_path, tokenizer):
    out = tmp_path / "rnn"
    t2r.save(converted_model("llama-window-kept", len(tokenizer)), out, tokenizer)
    (out / "stale.json").write_text("{}")
    replacement = converted_model("gpt2-linear", len(tokenizer))
    assert t2r.save(replacement, out, tokenizer, overwrite=True) == out
    assert entries(tmp_path) == {"rnn"}  # no .old / .partial left behind
    assert not (out / "stale.json").exists()
    model = t2r.load(out)
    assert isinstance(model, transformers.GPT2LMHeadModel)
    assert model.config.t2r["feature_map"] == "performer"
    torch.testing.assert_close(logits_of(model), logits_of(replacement), rtol=0, atol=1e-6)


def test_save_never_replaces_a_non_t2r_directory(tmp_path, tokenizer, tiny_model_dir):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("precious")
    plain = tmp_path / "plain"
    shutil.copytree(tiny_model_dir, plain)  # a plain HF model directory is not a t2r model either
    for out in (mine, plain):
        before = {p.name: p.read_bytes() for p in out.iterdir()}
        with pytest.raises(T2RError, match="not a t2r model directory"):
            t2r.save(converted_model("llama-window-kept", len(tokenizer)), out, tokenizer, overwrite=True)
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(T2RError):
        t2r.save(converted_model("llama-window-kept", len(tokenizer)), afile, tokenizer, overwrite=True)
    assert afile.read_text() == "x"
    assert entries(tmp_path) == {"mine", "plain", "afile"}


def _failing_save(model, monkeypatch):
    def save_pretrained(directory, **kwargs):
        (directory / "model.safetensors").write_bytes(b"half written")
        raise RuntimeError("disk full")
    monkeypatch.setattr(model, "save_pretrained", save_pretrained)
    return model


def test_failed_save_leaves_nothing_behind(tmp_path, tokenizer, monkeypatch):
    model = _failing_save(converted_model("llama-window-kept", len(tokenizer)), monkeypatch)
    with pytest.raises(RuntimeError, match="disk full"):
        t2r.save(model, tmp_path / "rnn", tokenizer)
    assert entries(tmp_path) == set()


def test_failed_overwrite_keeps_the_old_model(tmp_path, tokenizer, monkeypatch):
    out = tmp_path / "rnn"
    t2r.save(converted_model("llama-window-kept", len(tokenizer)), out, tokenizer)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    model = _failing_save(converted_model("gpt2-linear", len(tokenizer)), monkeypatch)
    with pytest.raises(RuntimeError, match="disk full"):
        t2r.save(model, out, tokenizer, overwrite=True)
    assert entries(tmp_path) == {"rnn"}
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


# ---------------------------------------------------------------------------------------------------------- load


def test_load_missing_path(tmp_path):
    with pytest.raises(NotAT2RModelError, match="not a directory.*t2r convert"):
        t2r.load(tmp_path / "missing")


def test_load_a_file(tmp_path):
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"x")
    with pytest.raises(NotAT2RModelError, match="not a directory.*t2r convert"):
        t2r.load(f)


def test_load_dir_without_config(tmp_path):
    with pytest.raises(NotAT2RModelError, match="no config.json.*t2r convert"):
        t2r.load(tmp_path)


def test_load_plain_hf_model_dir(tiny_model_dir):
    with pytest.raises(NotAT2RModelError, match=r"plain llama model, not a converted one.*t2r convert"):
        t2r.load(tiny_model_dir)


def test_load_dir_without_safetensors(tmp_path, tiny_converted_dir):
    path = damaged_copy(tiny_converted_dir, tmp_path / "m", lambda f: f.unlink())
    (path / "pytorch_model.bin").write_bytes(b"pickles are never loaded")
    with pytest.raises(NotAT2RModelError, match=r"no \.safetensors weights"):
        t2r.load(path)


@pytest.mark.parametrize("damage", [_truncate, _garbage_header, _not_json_header, _empty_file],
                         ids=["truncated", "garbage-header", "non-json-header", "empty"])
def test_load_damaged_safetensors(tmp_path, tiny_converted_dir, damage):
    path = damaged_copy(tiny_converted_dir, tmp_path / "m", damage)
    with pytest.raises(NotAT2RModelError, match="damaged or truncated.*convert or download it again"):
        t2r.load(path)


def test_load_safetensors_with_json_list_header(tmp_path, tiny_converted_dir):
    path = damaged_copy(tiny_converted_dir, tmp_path / "m", _json_list_header)
    with pytest.raises(NotAT2RModelError, match="damaged or truncated"):
        t2r.load(path)


def test_load_safetensors_with_invalid_dtype_in_header(tmp_path, tiny_converted_dir):
    path = damaged_copy(tiny_converted_dir, tmp_path / "m", _unknown_dtype_header)
    with pytest.raises(NotAT2RModelError, match="damaged or truncated"):
        t2r.load(path)


# ------------------------------------------------------------------------------------------------------- sources


def test_source_local_hf_dir_loads(tiny_model_dir):
    assert resolve(str(tiny_model_dir)).kind == "dir"
    model, tokenizer, source = load_model(str(tiny_model_dir))
    assert isinstance(model, transformers.LlamaForCausalLM) and not model.training
    assert source.kind == "dir" and source.describe() == str(tiny_model_dir)
    assert tokenizer("hi")["input_ids"]


def test_source_missing_gguf(tmp_path):
    with pytest.raises(ModelSourceError, match="GGUF file .* does not exist"):
        resolve(str(tmp_path / "model.gguf"))
    with pytest.raises(ModelSourceError, match="does not exist"):
        load_model(str(tmp_path / "model.gguf"))


def test_source_hub_id_offline_fails_without_touching_the_network(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    attempts = []

    def no_network(*args, **kwargs):
        attempts.append(args)
        raise OSError("network blocked by the test")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    for spec in ("some-org/some-model", "some-model"):
        assert resolve(spec).kind == "hub"
        with pytest.raises(ModelSourceError, match="HF_HUB_OFFLINE"):
            load_model(spec)
    assert attempts == []


@pytest.mark.parametrize("spec", ["./nope", "/x/y/z", "~/t2r-no-such-model", "a/b/c"])
def test_source_missing_path_like_spec(tmp_path, monkeypatch, spec):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelSourceError, match="no such"):
        resolve(spec)


def test_source_file_that_is_not_gguf(tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("hello")
    with pytest.raises(ModelSourceError, match="not a .gguf file"):
        load_model(str(notes))
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"not a gguf file at all" * 8)
    with pytest.raises(ModelSourceError, match="could not load"):
        load_model(str(fake))


def test_source_dir_without_config(tmp_path):
    with pytest.raises(ModelSourceError, match="without config.json"):
        resolve(str(tmp_path))


def test_source_missing_path_under_a_local_directory_is_not_a_hub_id(tmp_path, monkeypatch):
    """`runs/smol-typo` where runs/ exists here is a mistyped path, refused at once (it used to go to the hub, where
    an online machine retried for about 25 s before failing)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    (tmp_path / "runs").mkdir()
    with pytest.raises(ModelSourceError, match="'runs' is a directory here, so it is not read as a hub id"):
        resolve("runs/smol-typo")
    assert resolve("some-org/some-model").kind == "hub"  # no such local directory: still a hub id
