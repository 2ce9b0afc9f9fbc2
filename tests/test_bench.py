"""The bench runs end to end on a tiny converted model: JSON with every row, a PNG, a state that does not grow.
No wall-clock time is asserted anywhere."""

from __future__ import annotations

import json
import math

import pytest
import torch
import transformers

import t2r
from t2r.adapters import extend_kv_cache as extend_cache
from t2r.bench import (
    BenchSettings,
    copy_cache,
    parse_sizes,
    predict_seconds,
    ratios,
    render_bench,
    render_targets,
    targets,
)
from t2r.cli.evaluation import bench_command
from t2r.errors import T2RError
from t2r.settings import flag

ROW_KEYS = {"model", "context", "batch", "decode_ms_per_token", "prefill_tokens_per_s", "cache_bytes",
            "peak_rss_bytes"}
FAST = dict(decode_tokens=3, warmup=1, train_seq=32, train_steps=1, generate_tokens=2)


@pytest.fixture(scope="module")
def rnn_dir(tmp_path_factory, tiny_model_dir, tokenizer):
    """Every layer linear (hedgehog + a 4-token softmax window): the whole cache is a fixed-size state."""
    model = t2r.convert(transformers.AutoModelForCausalLM.from_pretrained(tiny_model_dir), feature_map="hedgehog",
                        feature_dim=8, window=4)
    path = tmp_path_factory.mktemp("bench") / "tiny-rnn"
    t2r.save(model, path, tokenizer)
    return path


@pytest.fixture(scope="module")
def result(rnn_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench-out")
    r = bench_command(str(rnn_dir), options=BenchSettings(contexts="16,64", batch="1,2", **FAST), threads=1,
                      plot=str(out / "bench.png"), out_json=str(out / "bench.json"))
    return r, out


def test_writes_json_with_every_row(result):
    r, out = result
    saved = json.loads((out / "bench.json").read_text())
    for key in ("machine", "torch", "threads", "rows", "ratios", "weight_floor_ms", "train_tokens_per_s", "notes",
                "generate_loop"):
        assert key in saved, key
    assert "targets" not in saved  # this project's development targets are not the user's business
    assert saved["threads"] == 1
    cells = {(row["model"], row["context"], row["batch"]) for row in saved["rows"]}
    assert cells == {(m, c, b) for m in ("original", "converted") for c in (16, 64) for b in (1, 2)}
    for row in saved["rows"]:
        assert ROW_KEYS <= set(row)
        assert row["decode_ms_per_token"] > 0 and row["peak_rss_bytes"] > 0 and row["cache_bytes"] > 0
        assert row["prefill_tokens_per_s"] > 0 and row["cache_fill"] == "real prefill"
        assert row["decode_steps"] == FAST["decode_tokens"]
    assert len(saved["ratios"]) == 4 and all(x["decode_ms_ratio"] > 0 for x in saved["ratios"])
    assert {"original", "converted", "seq"} <= set(saved["train_tokens_per_s"])
    assert saved["weight_floor_ms"] > 0


def test_writes_a_png(result):
    _, out = result
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_state_bytes_do_not_depend_on_context(result):
    r, _ = result
    for batch in (1, 2):
        size = {row["context"]: row["cache_bytes"] for row in r["rows"]
                if row["model"] == "converted" and row["batch"] == batch}
        kv = {row["context"]: row["cache_bytes"] for row in r["rows"]
              if row["model"] == "original" and row["batch"] == batch}
        assert size[16] == size[64]
        assert kv[64] > kv[16]
    state = [t for t in targets(r) if t["target"].startswith("converted state bytes")]
    assert state and all(t["met"] for t in state)


def test_render_names_every_cell(result):
    text = render_bench(result[0])
    assert "weight-reading floor" in text and "met" not in text  # no development targets in the user's output
    assert "at 64 tokens (batch 1) the converted model decodes" in text
    assert "its state is the same size at every context measured (16, 64)" in text
    assert render_targets(targets(result[0])).count("[") == len(targets(result[0]))
    assert sum(line.strip().startswith(("16 ", "64 ")) for line in text.splitlines()) == 4


def test_kept_softmax_layers_and_capped_prefill(tiny_converted_dir):
    """A model with a kept softmax layer; a prefill cap of 0 extends the first real cache instead of prefilling."""
    options = BenchSettings(contexts="8,40", batch="1", prefill_cap_s=0.0,
                            **{**FAST, "train_steps": 0, "generate_tokens": 0})
    r = bench_command(str(tiny_converted_dir), options=options, threads=1)
    rows = {(row["model"], row["context"]): row for row in r["rows"]}
    for model in ("original", "converted"):
        assert rows[(model, 8)]["cache_fill"] == "real prefill"
        assert rows[(model, 40)]["prefill_tokens_per_s"] is None
        assert "extended to 40" in rows[(model, 40)]["cache_fill"]
        assert rows[(model, 40)]["cache_bytes"] > rows[(model, 8)]["cache_bytes"]  # the kept softmax layer grows
    assert "train_tokens_per_s" not in r and "generate_loop" not in r


def test_extend_and_copy_cache():
    from conftest import tiny_model

    model = t2r.convert(tiny_model("llama"), feature_map="hedgehog", feature_dim=8, keep_softmax_layers=(0,))
    cache = t2r.new_cache(model)
    with torch.inference_mode():
        model(input_ids=torch.randint(0, 300, (1, 6)), cache=cache, use_cache=True)
    longer = extend_cache(cache, 15)
    assert longer.get_seq_length() == 15 and cache.get_seq_length() == 6
    assert longer.layers[0].keys.shape[-2] == 15
    assert torch.equal(longer.layers[0].keys[:, :, 6:12], cache.layers[0].keys)  # tiled
    assert longer.layers[1].seen_tokens == 15 and torch.equal(longer.layers[1].state.S, cache.layers[1].state.S)
    wide = copy_cache(cache, 3)
    assert wide.layers[1].state.S.shape[0] == 3 and cache.layers[1].state.S.shape[0] == 1
    assert t2r.cache_bytes(wide) == 3 * t2r.cache_bytes(cache)


def test_parse_sizes():
    assert parse_sizes("128,1k,4k, 16k") == [128, 1024, 4096, 16384]
    assert parse_sizes("8,1,8") == [1, 8]
    for bad in ("", "a,b", "0", "-4"):
        with pytest.raises(T2RError):
            parse_sizes(bad)


def test_bench_settings():
    """`t2r bench` takes one settings model: sizes as the command line writes them or as lists, checked."""
    assert BenchSettings().contexts == [128, 1024, 4096, 16384] and BenchSettings().batch == [1, 8]
    assert BenchSettings(contexts=[64, 16, 64]).contexts == [16, 64]
    assert BenchSettings.parse({"contexts": "1k", "decode_tokens": "3"}).decode_tokens == 3
    for bad, word in ((dict(contexts="a,b"), "--contexts"), (dict(decode_tokens="0"), "--decode-tokens"),
                      (dict(warmup="-1"), "--warmup"), (dict(batch=[0]), "batch")):
        with pytest.raises(T2RError, match=word):
            BenchSettings.parse(bad, flag)


def test_predict_seconds():
    assert predict_seconds([], 10) is None
    assert predict_seconds([(10, 1.0)], 20) == pytest.approx(2.0)  # one point: linear
    assert predict_seconds([(10, 1.0), (20, 2.0)], 40) == pytest.approx(4.0)  # linear history stays linear
    assert predict_seconds([(10, 1.0), (20, 4.0)], 40) == pytest.approx(16.0)


def _synthetic(orig_ms: dict, conv_ms: float, floor: float) -> dict:
    rows = []
    for (context, batch), ms in orig_ms.items():
        common = dict(context=context, batch=batch, peak_rss_bytes=1, prefill_tokens_per_s=1000.0)
        rows.append(dict(model="original", decode_ms_per_token=ms, cache_bytes=context * batch, **common))
        rows.append(dict(model="converted", decode_ms_per_token=conv_ms, cache_bytes=99 * batch, **common))
    return {"rows": rows, "contexts": sorted({c for c, _ in orig_ms}), "batches": sorted({b for _, b in orig_ms}),
            "weight_floor_ms": floor, "train_tokens_per_s": {"seq": 32, "original": 10.0, "converted": 12.0}}


def test_targets_are_evaluated_from_the_rows():
    r = _synthetic({(128, 1): 60.0, (4096, 1): 95.0, (16384, 1): 200.0, (128, 8): 70.0, (4096, 8): 300.0,
                    (16384, 8): 900.0}, conv_ms=55.0, floor=50.0)
    result = {t["target"]: t for t in targets(r)}
    met = {name: t["met"] for name, t in result.items()}
    assert met["converted decode flat: ms/token at 16384 / at 128 (batch 1)"] is True
    assert met["original / converted decode time at 16384 (batch 1)"] is True  # 200 / 55 = 3.6
    assert met["original / converted decode time (= tokens/s ratio) at 4096, batch 8"] is True  # 300 / 55
    assert met["slowest converted decode / weight-reading floor (batch 1)"] is True  # 1.1
    assert met["training tokens/s (fwd+bwd, seq 32) converted / original"] is True
    assert math.isclose(ratios(r["rows"])[0]["decode_ms_ratio"], 60 / 55)
    slow = {t["target"]: t["met"] for t in targets(_synthetic({(128, 1): 60.0, (1024, 1): 70.0}, 80.0, 50.0))}
    assert slow["slowest converted decode / original decode at 128 (batch 1)"] is False
    assert slow["original / converted decode time (= tokens/s ratio) at 4096, batch 8"] is None
