"""Behaviour is unchanged by refactors: tiny converted models of every family give the logits (and attention-transfer
losses) recorded before the relayout of issue 10 (tests/golden/converted_logits.json, recorded on commit 4b4b541 by
tests/golden/record_before_relayout.py; never recomputed after a change)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import t2r
from conftest import tiny_model
from t2r.transfer import AttentionTransfer

GOLDEN = json.loads((Path(__file__).parent / "golden" / "converted_logits.json").read_text())
IDS = torch.tensor(GOLDEN["input_ids"])
MASK = torch.tensor(GOLDEN["attention_mask"])


def _close(got: torch.Tensor, expected, rel: float = 1e-5) -> None:
    expected = torch.tensor(expected, dtype=torch.float64)
    scale = expected.abs().max().clamp_min(1e-6)
    assert float((got.double() - expected).abs().max() / scale) < rel


@pytest.mark.parametrize("case", sorted(GOLDEN["cases"]))
def test_logits_match_the_recording(case):
    family, _ = case.split("/")
    spec = GOLDEN["cases"][case]
    recipe = {k: tuple(v) if isinstance(v, list) else v for k, v in spec["recipe"].items()}
    model = t2r.convert(tiny_model(family), **recipe)
    with torch.no_grad():
        logits = model(input_ids=IDS, attention_mask=MASK).logits.double()
    _close(logits[:, [0, 4, 20, 36], :6], spec["first"])
    assert float(logits.sum()) == pytest.approx(spec["sum"], rel=1e-5, abs=1e-3)
    assert float(logits.abs().sum()) == pytest.approx(spec["abs_sum"], rel=1e-5)


@pytest.mark.parametrize("case", sorted(GOLDEN["transfer"]))
def test_attention_transfer_losses_match_the_recording(case):
    family, name = case.split("/")
    recipe = {k: tuple(v) if isinstance(v, list) else v for k, v in GOLDEN["cases"][case]["recipe"].items()}
    model = t2r.convert(tiny_model(family), **recipe)
    with torch.no_grad():
        result = AttentionTransfer(model, attn_ce=0.5)(IDS)
    for key, expected in GOLDEN["transfer"][case].items():
        _close(result[key], expected)
