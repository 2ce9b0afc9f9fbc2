"""`t2r bench` beside the float32 converted model: int8 rows interleaved with it, llama.cpp reference rows that are
skipped with a note when llama-cpp-python is absent, and measured through its API when present (a stand-in here)."""

from __future__ import annotations

import sys
import types

import pytest
import transformers

import t2r
from t2r.bench import BenchSettings, render_bench
from t2r.bench import llamacpp as llamacpp_module
from t2r.bench.llamacpp import MISSING, kv_bytes, llamacpp_rows
from t2r.bench.report import targets
from t2r.cli.evaluation import bench_command
from t2r.errors import T2RError

FAST = dict(decode_tokens=3, warmup=1, train_steps=0, generate_tokens=0)


@pytest.fixture(scope="module")
def rnn_dir(tmp_path_factory, tiny_model_dir, tokenizer):
    model = t2r.convert(transformers.AutoModelForCausalLM.from_pretrained(tiny_model_dir), feature_map="hedgehog",
                        feature_dim=8)
    path = tmp_path_factory.mktemp("bench16") / "tiny-rnn"
    t2r.save(model, path, tokenizer)
    return path


@pytest.fixture
def gguf(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"GGUF")
    return path


def test_int8_rows_and_llamacpp_skipped_when_absent(rnn_dir, gguf, monkeypatch):
    monkeypatch.setattr(llamacpp_module, "_load_llama", lambda: None)
    r = bench_command(str(rnn_dir), options=BenchSettings(contexts="8,32", batch="1", quantize="int8",
                                                          llamacpp=str(gguf), **FAST), threads=1)
    names = {row["model"] for row in r["rows"]}
    assert names == {"original", "converted", "converted-int8"}
    int8 = [row for row in r["rows"] if row["model"] == "converted-int8"]
    conv = {row["context"]: row for row in r["rows"] if row["model"] == "converted"}
    assert all(row["cache_bytes"] == conv[row["context"]]["cache_bytes"] for row in int8)  # state stays float32
    assert r["llamacpp"] == {"rows": [], "skipped": MISSING}
    text = render_bench(r)
    assert "converted-int8 ms/token: 8x1" in text and MISSING in text
    assert any(t["target"].startswith("converted-int8 / converted") and t["value"] for t in targets(r))  # benchmarks/bench_targets.py
    assert any(n.startswith("converted-int8:") for n in r["notes"])


def test_llamacpp_missing_file_is_a_note(tmp_path):
    out = llamacpp_rows(str(tmp_path / "none.gguf"), BenchSettings(contexts="8", **FAST))
    assert out["rows"] == [] and "not a GGUF file" in out["skipped"]


def test_llamacpp_rows_through_the_api(gguf, monkeypatch):
    """A stand-in `llama_cpp.Llama` records the calls: the prompt is prefilled once, then one token per step."""
    calls = []

    class FakeLlama:
        metadata = {"general.architecture": "llama", "llama.block_count": "30", "llama.attention.head_count": "9",
                    "llama.attention.head_count_kv": "3", "llama.embedding_length": "576"}

        def __init__(self, model_path, n_ctx, n_threads, **kwargs):
            calls.append(("init", n_ctx, n_threads))

        def n_vocab(self):
            return 100

        def eval(self, tokens):
            calls.append(("eval", len(tokens)))

    monkeypatch.setitem(sys.modules, "llama_cpp", types.SimpleNamespace(Llama=FakeLlama))
    out = llamacpp_rows(str(gguf), BenchSettings(contexts="16,64", **FAST), threads=1)
    assert [row["context"] for row in out["rows"]] == [16, 64]
    assert calls[:2] == [("init", 16 + 1 + 3 + 8, 1), ("eval", 16)] and calls[2:6] == [("eval", 1)] * 4
    assert out["rows"][1]["cache_bytes"] == 2 * 30 * 3 * 64 * 64 * 2 == kv_bytes(FakeLlama.metadata, 64)
    assert all(row["decode_ms_per_token"] > 0 and row["prefill_tokens_per_s"] > 0 for row in out["rows"])


def test_bad_quantize_flag_is_one_line(rnn_dir):
    with pytest.raises(T2RError, match="--quantize is one of"):
        bench_command(str(rnn_dir), options=BenchSettings(contexts="8", batch="1", quantize="int3", **FAST))


def test_llamacpp_steps_alternate_with_the_torch_models(rnn_dir, gguf, monkeypatch):
    """In `t2r bench`, llama.cpp's one-token steps of a context take turns with the torch models' steps (so both are
    timed under the same load); its prefill comes after theirs and its row lands in result["llamacpp"]."""
    from t2r.bench import measure

    events = []

    class FakeLlama:
        metadata = {"general.architecture": "llama", "llama.block_count": "2", "llama.attention.head_count": "4",
                    "llama.embedding_length": "64"}

        def __init__(self, model_path, n_ctx, n_threads, **kwargs):
            events.append(f"init {n_ctx}")

        def n_vocab(self):
            return 100

        def eval(self, tokens):
            events.append(f"llama {len(tokens)}")

    real_iter_decode = measure.iter_decode

    def logged(*args, **kwargs):
        for tokens in real_iter_decode(*args, **kwargs):
            events.append("torch")
            yield tokens

    monkeypatch.setitem(sys.modules, "llama_cpp", types.SimpleNamespace(Llama=FakeLlama))
    monkeypatch.setattr(measure, "iter_decode", logged)
    r = bench_command(str(rnn_dir), options=BenchSettings(contexts="8,16", batch="1,2", llamacpp=str(gguf), **FAST),
                      threads=1)
    rows = r["llamacpp"]["rows"]
    assert [row["context"] for row in rows] == [8, 16] and "alternate" in r["llamacpp"]["note"]
    assert all(row["decode_steps"] == 3 and row["decode_cpu_ms_per_token"] >= 0
               and row["cache_bytes"] == kv_bytes(FakeLlama.metadata, row["context"])
               for row in rows)
    first = events.index("init 20")  # context 8 + warm-up 1 + 3 steps + 8
    turn = events[first + 2:first + 2 + 3 * 4]  # prefill, then each step: original, converted, llama.cpp
    assert turn == ["torch", "torch", "llama 1"] * 4
    assert not any(row["model"] == "llama.cpp" for row in r["rows"])
    assert "llama.cpp" in render_bench(r)
    r = bench_command(str(rnn_dir), options=BenchSettings(contexts="8", batch="2", llamacpp=str(gguf), **FAST),
                      threads=1)
    assert "--batch does not include 1" in r["llamacpp"]["skipped"]
