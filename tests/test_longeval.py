"""Loss by position over long documents (chunks that carry the state) and evaluation-time ablations, on tiny models."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import t2r
from conftest import tiny_model
from t2r.ablation import ablated
from t2r.adapters import original_model
from t2r.attention import LinearAttention
from t2r.errors import T2RError
from t2r.longeval import PositionSettings, bucket_losses, document_nll, position_losses
from t2r.mixers import LinearMixer

IDS = torch.randint(3, 300, (2, 150), generator=torch.Generator().manual_seed(0))


def _one_forward_nll(model, ids):
    with torch.no_grad():
        logits = model(input_ids=ids).logits[:, :-1].double()
    return -F.log_softmax(logits, -1).gather(-1, ids[:, 1:, None]).squeeze(-1)  # (B, L-1)


def _rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("recipe", [dict(feature_map="hedgehog", feature_dim=8, window=7),
                                    dict(feature_map="t2r", feature_dim=8, keep_softmax_layers=(1,))],
                         ids=["window", "kept-softmax"])
@pytest.mark.parametrize("chunk", [1, 37, 64, 500])
def test_chunked_reading_equals_one_forward(recipe, chunk):
    student = t2r.convert(tiny_model("llama"), **recipe)
    for model in (student, original_model(student)):
        expected = _one_forward_nll(model, IDS)
        got = document_nll(model, IDS, PositionSettings(chunk=chunk))
        assert _rel(got, expected) < 1e-5


def test_buckets_sum_to_the_whole_sequence_loss():
    model = t2r.convert(tiny_model("llama"), feature_map="hedgehog", feature_dim=8, window=7)
    result = position_losses(model, IDS, PositionSettings(chunk=40, edges=(0, 16, 64, 256)))
    total = float(_one_forward_nll(model, IDS).sum())
    assert [(b["start"], b["end"]) for b in result["buckets"]] == [(0, 16), (16, 64), (64, 256)]
    assert sum(b["tokens"] for b in result["buckets"]) == IDS.numel() - IDS.shape[0] == result["tokens"]
    assert sum(b["tokens"] * b["nll"] for b in result["buckets"]) == pytest.approx(total, rel=1e-6)
    assert result["nll"] * result["tokens"] == pytest.approx(total, rel=1e-6) and result["stopped_at"] is None


def test_bucket_positions_are_the_predicted_tokens():
    nll = torch.arange(1, 10, dtype=torch.float64)[None]  # the loss of token t is t: positions 1..9
    buckets = bucket_losses(nll, (0, 4, 8, 16))
    assert [(b["tokens"], b["nll"]) for b in buckets] == [(3, 2.0), (4, 5.5), (2, 8.5)]


def test_a_growing_cache_stops_at_the_cap_and_says_where():
    teacher = original_model(t2r.convert(tiny_model("llama"), feature_map="elu"))
    result = position_losses(teacher, IDS, PositionSettings(chunk=50, max_cache_bytes=1))
    assert result["stopped_at"] == 50 and result["tokens"] == 2 * 49  # read the first chunk only
    rnn = t2r.convert(tiny_model("llama"), feature_map="elu")
    state = position_losses(rnn, IDS, PositionSettings(chunk=50, max_cache_bytes=10**9))
    assert state["stopped_at"] is None


def test_learned_positions_refuse_longer_documents():
    model = t2r.convert(tiny_model("gpt2", n_positions=64), feature_map="elu")
    with pytest.raises(T2RError, match="longer than this model's 64 learned positions"):
        position_losses(model, IDS)


def test_window_only_is_sliding_window_softmax_attention():
    """The linear part off leaves exactly softmax attention over the last W keys: a Mistral built with the same
    weights and `sliding_window = W` gives the same logits."""
    student = t2r.convert(tiny_model("mistral"), feature_map="hedgehog", feature_dim=8, window=5)
    reference = tiny_model("mistral", sliding_window=5)  # same seed: the same weights
    with torch.no_grad():
        expected = reference(input_ids=IDS[:, :40]).logits
        plain = student(input_ids=IDS[:, :40]).logits
        with ablated(student, "linear"):
            torch.testing.assert_close(student(input_ids=IDS[:, :40]).logits, expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(student(input_ids=IDS[:, :40]).logits, plain)  # restored


def test_linear_only_is_the_linear_mixer_with_the_same_feature_maps():
    student = t2r.convert(tiny_model("llama"), feature_map="hedgehog", feature_dim=8, window=5)
    linear = t2r.convert(tiny_model("llama"), feature_map="hedgehog", feature_dim=8)
    linear.load_state_dict({k: v for k, v in student.state_dict().items() if ".mixer." not in k})
    with torch.no_grad(), ablated(student, "window"):
        assert all(isinstance(m.mixer, LinearMixer) for m in student.modules() if isinstance(m, LinearAttention))
        torch.testing.assert_close(student(input_ids=IDS).logits, linear(input_ids=IDS).logits)


def test_softmax_layers_made_linear_only_inside_the_block():
    student = t2r.convert(tiny_model("llama"), feature_map="t2r", feature_dim=8, keep_softmax_layers=(0, 2))
    count = lambda: sum(isinstance(m, LinearAttention) for m in student.modules())  # noqa: E731
    with torch.no_grad():
        before = student(input_ids=IDS).logits
        with ablated(student, "softmax-layers"):
            assert count() == 3
            assert not torch.allclose(student(input_ids=IDS).logits, before)
            assert position_losses(student, IDS[:1, :60], PositionSettings(chunk=16))["tokens"] == 59
        assert count() == 1
        torch.testing.assert_close(student(input_ids=IDS).logits, before)


def test_ablations_that_do_not_apply_are_refused():
    pure = t2r.convert(tiny_model("llama"), feature_map="elu")
    with pytest.raises(T2RError, match="linear mixer has no linear part"):
        with ablated(pure, "linear"):
            pass
    with pytest.raises(T2RError, match="no softmax layers"):
        with ablated(pure, "softmax-layers"):
            pass
    with pytest.raises(T2RError, match="unknown ablation 'mlp'; choose one of: linear, window, gate, softmax-layers"):
        with ablated(pure, "mlp"):
            pass


def test_models_side_by_side_and_plot(tmp_path):
    pytest.importorskip("matplotlib")
    from t2r.longeval import plot_positions

    student = t2r.convert(tiny_model("llama"), feature_map="hedgehog", feature_dim=8, window=7)
    settings = PositionSettings(chunk=64, edges=(0, 16, 64, 256))
    results = {name: position_losses(m, IDS, settings) for name, m in (("teacher", original_model(student)),
                                                                        ("student", student))}
    assert all(r["trained_context"] == 512 and len(r["buckets"]) == 3 for r in results.values())
    path = plot_positions(results, tmp_path / "pos.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
