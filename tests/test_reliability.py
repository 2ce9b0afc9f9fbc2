"""Nothing lost, nothing let in (issue 15): every bad input the probe of main found, each ending in one line
`t2r CMD: error: ...` with exit code 2 and nothing written; pickled weights refused before any unpickler sees them;
damaged weights (NaN, a flipped exponent bit) named; impossible memory requests refused with the estimate up front;
a stale run lock taken over with a warning. Tiny models, CPU, seconds."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

import t2r
import t2r.budget
from conftest import byte_tokenizer, tiny_model
from t2r.errors import T2RError
from t2r.sources import load_model
from t2r.train import RunLock
from test_cli import assert_usage_error, run_cli

CONVERT = ["--feature-map", "t2r", "--feature-dim", "8"]
FAST_BENCH = ["--decode-tokens", "1", "--warmup", "0", "--train-steps", "0", "--generate-tokens", "0"]
TRAIN = ["--steps", "1", "--block-size", "16", "--no-progress"]
SMALL_MEMORY = 50 * 2**20  # the resource cases run as on a machine with 50 MiB free: the tiny models' sizes scaled


class Payload:
    """Unpickling this runs `touch MARKER`: what a hostile pytorch_model.bin does."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _damaged_copy(src, dst, edit) -> None:
    shutil.copytree(src, dst)
    weights = load_file(str(dst / "model.safetensors"))
    edit(weights)
    save_file(weights, str(dst / "model.safetensors"), metadata={"format": "pt"})


def _flip_exponent_bit(weights) -> None:
    name = next(k for k in weights if "embed_tokens" in k)
    bits = weights[name].view(torch.int32)
    bits[3, 5] ^= 1 << 30  # the top exponent bit: 0.02 -> ~7e36 (row 3: row 0, the padding token's, is zeros)


def _nan_in_q_proj(weights) -> None:
    name = next(k for k in weights if "layers.0.self_attn.q_proj.weight" in k)
    weights[name][0, 0] = float("nan")


# config.json damaged: a field of the wrong type, a missing key, impossible values, an unknown map or mixer
CONFIG_EDITS = {"hidden-size-text": lambda c: c.update(hidden_size="abc"),
                "no-layer-count": lambda c: c.pop("num_hidden_layers"),
                "no-model-type": lambda c: c.pop("model_type"),
                "zero-heads": lambda c: c.update(num_attention_heads=0),
                "unknown-feature-map": lambda c: c["t2r"].update(feature_map="nope"),
                "unknown-mixer": lambda c: c["t2r"].update(mixer="nope"),
                "recipe-a-list": lambda c: c.update(t2r=[1, 2]),
                "negative-feature-dim": lambda c: c["t2r"].update(feature_dim=-3)}
CONFIG_WORDS = {"hidden-size-text": "hidden_size", "no-layer-count": "config does not match the weights",
                "no-model-type": "model_type", "zero-heads": "division", "unknown-feature-map": "unknown feature map",
                "unknown-mixer": "unknown mixer", "recipe-a-list": "unknown recipe keys",
                "negative-feature-dim": "feature_dim"}


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_model_dir, tiny_converted_dir):
    """Every damaged or hostile input of the cases below, made once."""
    root = tmp_path_factory.mktemp("reliability")
    pickled = root / "pickled"
    pickled.mkdir()
    for f in tiny_model_dir.iterdir():
        if f.name != "model.safetensors":
            shutil.copy(f, pickled)
    torch.save({"model.embed_tokens.weight": Payload(root / "PWNED")}, pickled / "pytorch_model.bin")
    truncated = root / "truncated"
    shutil.copytree(tiny_converted_dir, truncated)
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
    _damaged_copy(tiny_converted_dir, root / "nan", _nan_in_q_proj)
    _damaged_copy(tiny_converted_dir, root / "bitflip", _flip_exponent_bit)
    gpt2 = root / "gpt2-teacher"  # another architecture and vocabulary, the same tokenizer files
    tiny_model("gpt2", vocab_size=300).save_pretrained(gpt2)
    byte_tokenizer().save_pretrained(gpt2)
    (root / "text.txt").write_text("It is a truth universally acknowledged. " * 200)
    (root / "a-file").write_text("not a directory")
    shutil.copytree(tiny_converted_dir, root / "real-rnn")
    os.symlink(root / "real-rnn", root / "link-rnn")
    read_only = root / "read-only"
    read_only.mkdir()
    read_only.chmod(0o555)
    if os.access(read_only, os.W_OK):  # root ignores permission bits: sysfs refuses new entries to everyone
        read_only = Path("/sys/t2r-read-only")
    yaml = {"data": "data: 123", "convert": "convert: 5", "eval": "eval: 'x'", "key": "convert: {feature_mpa: t2r}"}
    for name, line in yaml.items():
        (root / f"{name}.yaml").write_text(f"name: bad\nmodel: {tiny_model_dir}\n{line}\n")
    (root / "empty.txt").write_text("")
    (root / "binary.bin").write_bytes(bytes(range(256)) * 50)
    (root / "latin1.txt").write_bytes(("caf\xe9 na\xefve " * 300).encode("latin-1"))
    (root / "broken.jsonl").write_text('{"text": "hello there"}\n{"text": broken\n' + '{"text": "more"}\n' * 50)
    (root / "no-text.jsonl").write_text('{"body": "x"}\n' * 10)
    (root / "empty-dir").mkdir()
    for name, edit in CONFIG_EDITS.items():
        shutil.copytree(tiny_converted_dir, root / f"config-{name}")
        config = json.loads((root / f"config-{name}" / "config.json").read_text())
        edit(config)
        (root / f"config-{name}" / "config.json").write_text(json.dumps(config))
    gpt2_rnn = t2r.convert(tiny_model("gpt2", vocab_size=259, n_positions=64), feature_map="t2r", feature_dim=8)
    t2r.save(gpt2_rnn, root / "gpt2-rnn", byte_tokenizer())
    yield {"root": root, "hf": tiny_model_dir, "rnn": tiny_converted_dir, "ro": read_only,
           "marker": root / "PWNED"}
    (root / "read-only").chmod(0o755)


# (id, argv with {placeholders}, words the error line must hold, whether to check that {out} was not made)
CASES = [
    # pickled weights: refused before torch.load, with the way to convert them
    ("pickle-convert", ["convert", "{root}/pickled", "--out", "{out}", *CONVERT], ["pickled", "save_pretrained"], True),
    ("pickle-eval", ["eval", "{root}/pickled", "--data", "{root}/text.txt"], ["pickled"], False),
    ("pickle-lm-eval", ["lm-eval", "{root}/pickled", "--limit", "1"], ["pickled"], False),
    ("pickle-finetune", ["finetune", "{root}/pickled", "--data", "{root}/text.txt", "--out", "{out}", *TRAIN],
     ["pickled"], True),
    ("pickle-kd-teacher", ["finetune", "{rnn}", "--data", "{root}/text.txt", "--kd", "1", "--teacher",
                           "{root}/pickled", "--out", "{out}", *TRAIN], ["pickled"], True),
    # outputs that cannot be written
    ("read-only-convert", ["convert", "{hf}", "--out", "{ro}/out", *CONVERT], ["cannot write --out"], False),
    ("read-only-data", ["data", "{root}/text.txt", "--model", "{hf}", "--out", "{ro}/out", "--block-size", "16"],
     ["cannot write --out"], False),
    ("read-only-distill", ["distill", "{rnn}", "--data", "{root}/text.txt", "--out", "{ro}/out", *TRAIN],
     ["cannot write --out"], False),
    ("read-only-bench-plot", ["bench", "{rnn}", "--contexts", "8", "--batch", "1", *FAST_BENCH, "--plot",
                              "{ro}/bench.png"], ["cannot write --plot"], False),
    ("out-is-a-file-data", ["data", "{root}/text.txt", "--model", "{hf}", "--out", "{root}/a-file"],
     ["is a file"], False),
    ("out-is-a-file-distill", ["distill", "{rnn}", "--data", "{root}/text.txt", "--out", "{root}/a-file", *TRAIN],
     ["is a file"], False),
    ("out-symlink-convert", ["convert", "{hf}", "--out", "{root}/link-rnn", "--overwrite", *CONVERT],
     ["symbolic link"], False),
    ("out-symlink-distill", ["distill", "{rnn}", "--data", "{root}/text.txt", "--out", "{root}/link-rnn",
                             "--overwrite", *TRAIN], ["symbolic link"], False),
    # values
    ("empty-prompt", ["generate", "{rnn}", "--prompt", ""], ["empty"], False),
    ("contexts-inf", ["bench", "{rnn}", "--contexts", "inf"], ["--contexts"], False),
    ("tokens-1e400", ["distill", "{rnn}", "--tokens", "1e400", "--out", "{out}"], ["--tokens", "finite"], True),
    ("device-bogus", ["bench", "{rnn}", "--contexts", "8", "--batch", "1", "--device", "bogus"], ["--device"], False),
    ("lm-eval-device-bogus", ["lm-eval", "{rnn}", "--device", "bogus"], ["--device"], False),
    ("lm-eval-unknown-task", ["lm-eval", "{rnn}", "--tasks", "no_such_task", "--limit", "1"],
     ["unknown lm-eval task"], False),
    ("lm-eval-truncated", ["lm-eval", "{root}/truncated", "--limit", "1"], ["damaged or truncated"], False),
    # recipes
    ("yaml-data-123", ["pipeline", "--config", "{root}/data.yaml", "--out", "{out}"], ["'123'"], False),
    ("yaml-convert-5", ["pipeline", "--config", "{root}/convert.yaml", "--out", "{out}"], ["convert:"], True),
    ("yaml-eval-x", ["pipeline", "--config", "{root}/eval.yaml", "--out", "{out}"], ["eval:"], True),
    ("yaml-misspelt-key", ["pipeline", "--config", "{root}/key.yaml", "--out", "{out}"],
     ["convert.feature_mpa", "unknown setting"], True),
    # damaged weights, named
    ("nan-verify", ["verify", "{root}/nan"], ["q_proj", "NaN"], False),
    ("nan-generate", ["generate", "{root}/nan"], ["q_proj", "NaN"], False),
    ("nan-eval", ["eval", "{root}/nan", "--data", "{root}/text.txt"], ["q_proj", "NaN"], False),
    ("bitflip-eval", ["eval", "{root}/bitflip", "--data", "{root}/text.txt"], ["embed_tokens", "magnitude"], False),
    ("bitflip-generate", ["generate", "{root}/bitflip"], ["embed_tokens", "magnitude"], False),
    # impossible sizes, refused with the estimate before allocating
    ("feature-dim-100000", ["convert", "{hf}", "--out", "{out}", "--feature-map", "t2r", "--feature-dim",
                            "100000"], ["needs at least", "MiB", "--feature-dim"], True),
    ("bench-batch-1000000", ["bench", "{rnn}", "--contexts", "128", "--batch", "1000000"],
     ["needs at least", "--batch"], False),
    ("bench-contexts-1000000", ["bench", "{rnn}", "--contexts", "1000000", "--batch", "1"],
     ["needs at least", "--contexts"], False),
    ("distill-batch-size-1e8", ["distill", "{rnn}", "--data", "{root}/text.txt", "--out", "{out}",
                                "--batch-size", "100000000", *TRAIN], ["needs at least", "--batch-size"], False),
    # a KD teacher that predicts other tokens
    ("kd-teacher-other-vocab", ["finetune", "{rnn}", "--data", "{root}/text.txt", "--kd", "1", "--teacher",
                                "{root}/gpt2-teacher", "--out", "{out}", *TRAIN], ["300 tokens", "259"], True),
]


# bad files, to every command that reads text: what each gets
BAD_FILES = {"empty.txt": "is empty", "binary.bin": "not UTF-8", "latin1.txt": "not UTF-8",
             "broken.jsonl": "broken.jsonl:2 is not valid JSON", "no-text.jsonl": "no string field 'text'",
             "empty-dir": "has no .txt"}
READERS = {"data": ["data", "{file}", "--model", "{hf}", "--out", "{out}", "--block-size", "16"],
           "distill": ["distill", "{rnn}", "--data", "{file}", "--out", "{out}", *TRAIN],
           "eval-data": ["eval", "{rnn}", "--data", "{file}"], "eval-text": ["eval", "{rnn}", "--text", "{file}"]}
CASES += [(f"{reader}-{name}", [a.replace("{file}", "{root}/" + name) for a in argv], [words], "{out}" in argv)
          for name, words in BAD_FILES.items() for reader, argv in READERS.items()]
CASES += [(f"config-{name}", ["generate", "{root}/config-" + name], [words], False)
          for name, words in CONFIG_WORDS.items()]
CASES += [
    ("max-new-tokens-0", ["generate", "{rnn}", "--max-new-tokens", "0"], ["positive"], False),
    ("max-new-tokens-negative", ["generate", "{rnn}", "--max-new-tokens", "-3"], ["positive"], False),
    ("tokens-negative", ["distill", "{rnn}", "--tokens", "-5", "--out", "{out}"], ["--tokens"], True),
    ("tokens-0", ["distill", "{rnn}", "--tokens", "0", "--out", "{out}"], ["--tokens", "positive"], True),
    ("steps-negative", ["finetune", "{rnn}", "--steps", "-1", "--out", "{out}"], ["--steps"], True),
    ("contexts-negative", ["bench", "{rnn}", "--contexts", "-4"], ["--contexts", "positive"], False),
    ("context-negative", ["eval", "{rnn}", "--context", "-1"], ["--context"], False),
    ("verify-tokens-negative", ["verify", "{rnn}", "--tokens", "-5"], ["tokens"], False),
    ("lm-eval-limit-negative", ["lm-eval", "{rnn}", "--limit", "-1"], ["--limit"], False),
    ("temperature-negative", ["generate", "{rnn}", "--sample", "--temperature", "-1"], ["temperature"], False),
    ("top-p-nan", ["generate", "{rnn}", "--sample", "--top-p", "nan"], ["top-p"], False),
    ("prompt-past-positions", ["generate", "{root}/gpt2-rnn", "--prompt", "x" * 100], ["64 learned position"], False),
    ("context-past-positions", ["eval", "{root}/gpt2-rnn", "--data", "{root}/text.txt", "--context", "128"],
     ["64 learned position"], False),
    ("verify-past-positions", ["verify", "{root}/gpt2-rnn", "--tokens", "100"], ["64 learned position"], False),
]


@pytest.mark.parametrize("case, argv, words, out", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_exit_2(capsys, monkeypatch, files, case, argv, words, out):
    monkeypatch.setattr(t2r.budget, "available_bytes", lambda: SMALL_MEMORY)
    loads = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: loads.append(a) or real_load(*a, **k))
    argv = [a.format(**files, out=files["root"] / f"out-{case}") for a in argv]
    code, _, err = run_cli(capsys, *argv)
    assert_usage_error(code, err, argv[0], *words)
    assert not loads, "an unpickler was reached"
    assert not files["marker"].exists()
    if out:
        assert not (files["root"] / f"out-{case}").exists()


def test_symlinked_output_keeps_its_target(files):
    """--overwrite through a link is refused and the directory it points to is untouched."""
    target = files["root"] / "real-rnn"
    assert sorted(p.name for p in target.iterdir()) == sorted(p.name for p in files["rnn"].iterdir())
    assert (files["root"] / "link-rnn").is_symlink()


def test_pickle_refused_by_the_library(files):
    with pytest.raises(T2RError, match="pickled"):
        load_model(str(files["root"] / "pickled"))
    converted_pickle = files["root"] / "pickled-converted"
    shutil.copytree(files["root"] / "pickled", converted_pickle)
    shutil.copy(files["rnn"] / "config.json", converted_pickle / "config.json")
    with pytest.raises(T2RError, match="pickled.*save_pretrained"):
        t2r.load(converted_pickle)
    with pytest.raises(OSError, match="safetensors"):  # HF's own loader, after `import t2r`: no pickle either
        transformers.AutoModelForCausalLM.from_pretrained(converted_pickle)
    assert not files["marker"].exists()


def test_a_model_with_nan_weights_is_named_by_the_library(files):
    from t2r.verify import check_weights

    with pytest.raises(T2RError, match=r"layers\.0\.self_attn\.q_proj\.weight has 1 NaN"):
        check_weights(t2r.load(files["root"] / "nan"))


def test_an_interrupted_save_leaves_the_previous_model(tmp_path, tokenizer):
    """A crash between the two renames of `replace_dir` (old moved aside, new not yet in place): the next load puts
    the previous model back."""
    model = t2r.convert(tiny_model("llama", vocab_size=len(tokenizer)), feature_map="t2r", feature_dim=8)
    out = tmp_path / "rnn"
    t2r.save(model, out, tokenizer)
    os.replace(out, tmp_path / ".rnn.old")  # what the crash leaves
    reloaded = t2r.load(out)
    assert all(torch.equal(a, b) for a, b in zip(reloaded.state_dict().values(), model.state_dict().values()))


def test_stale_run_lock_is_taken_over_with_a_warning(tmp_path, caplog):
    out = tmp_path / "run"
    dead = os.fork()
    if dead == 0:
        os._exit(0)
    os.waitpid(dead, 0)  # a pid that is gone
    (tmp_path / ".run.lock").write_text(str(dead))
    with caplog.at_level(logging.WARNING, logger="t2r.train.checkpoint"):
        lock = RunLock(out).acquire()
    try:
        assert f"process {dead}, which is gone" in caplog.text
        assert (tmp_path / ".run.lock").read_text() == str(os.getpid())
    finally:
        lock.release()


def test_a_held_lock_is_refused_naming_the_holder(tmp_path):
    from t2r.train import TrainError

    lock = RunLock(tmp_path / "run").acquire()
    try:
        with pytest.raises(TrainError, match=f"process {os.getpid()}"):
            RunLock(tmp_path / "run").acquire()
    finally:
        lock.release()


def test_memory_estimates_are_floors():
    """The estimates count only tensors a request cannot do without: SmolLM2's KV cache at 1M tokens is 2 x 30
    layers x 3 KV heads x 64 dims x 1M x 4 bytes."""
    config = transformers.LlamaConfig(num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                                      hidden_size=576, head_dim=64)
    assert t2r.budget.kv_cache_bytes(config, 1_000_000, 1) == 2 * 30 * 3 * 64 * 1_000_000 * 4
    assert t2r.budget.activation_bytes(config, 512) == 30 * 576 * 512 * 4
    with pytest.raises(t2r.budget.OutOfMemoryError, match="needs at least"):
        t2r.budget.require_memory(2 * t2r.budget.available_bytes() + 2**30, "this", "ask for less")
