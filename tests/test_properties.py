"""Property-based tests (hypothesis, issue 15): for drawn shapes, lengths, chunk sizes, left padding, dtypes, feature
maps and mixers, the chunked, recurrent and quadratic forms agree, and a stream split anywhere (prefill, then the rest
with the carried state) gives the outputs of one pass. Derandomized (the same examples every run), CPU, seconds."""

from __future__ import annotations

import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from t2r.attention import LinearAttention
from t2r.feature_maps import FEATURE_MAPS
from t2r.ops import linear_attention
from t2r.recipe import Recipe

TOL = 1e-4  # float32; the forms sum in different orders
MIXERS = [("linear", 0), ("window", 3), ("gla", 0), ("gla", 2), ("delta", 0), ("gated_delta", 0), ("gated_delta", 2)]
EXAMPLES = settings(max_examples=25, deadline=None, derandomize=True, print_blob=True)


def rel(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-12))


@st.composite
def problems(draw):
    return dict(B=draw(st.integers(1, 3)), T=draw(st.integers(1, 70)), H=draw(st.integers(1, 3)),
                D=draw(st.integers(1, 9)), chunk=draw(st.integers(1, 80)), seed=draw(st.integers(0, 2**16)),
                mixer=draw(st.sampled_from(MIXERS)), feature_map=draw(st.sampled_from(FEATURE_MAPS.names())))


def build(p) -> LinearAttention:
    torch.manual_seed(p["seed"])
    mixer, window = p["mixer"]
    recipe = Recipe(feature_map=p["feature_map"], mixer=mixer, window=window, chunk_size=p["chunk"])
    att = LinearAttention(layer_idx=0, num_heads=p["H"], num_kv_heads=p["H"], head_dim=p["D"], scale=p["D"] ** -0.5,
                          recipe=recipe)
    with torch.no_grad():  # gates and window factors away from their initial values
        for param in att.mixer.parameters():
            param.add_(0.3 * torch.randn_like(param))
    return att


def tensors(p, dtype=torch.float32):
    g = torch.Generator().manual_seed(p["seed"])
    q, k, v = (torch.randn(p["B"], p["T"], p["H"], p["D"], generator=g).to(dtype) for _ in range(3))
    pads = torch.randint(0, p["T"], (p["B"],), generator=g)
    pads[0] = 0  # one row unpadded
    mask = torch.arange(p["T"])[None, :] >= pads[:, None]  # (B, T) left padding
    return q, k, v, mask


@EXAMPLES
@given(problems())
def test_chunked_recurrent_and_quadratic_forms_agree(p):
    att = build(p)
    q, k, v, mask = tensors(p)
    with torch.no_grad():
        out = {mode: att.attend(q, k, v, key_mask=mask, mode=mode) for mode in ("chunk", "recurrent", "quadratic")}
    for mode in ("chunk", "recurrent"):
        assert torch.isfinite(out[mode]).all()
        assert rel(out[mode][mask], out["quadratic"][mask]) < TOL, mode


@EXAMPLES
@given(problems(), st.floats(0.0, 1.0))
def test_a_stream_split_anywhere_carries_its_state(p, where):
    att = build(p)
    q, k, v, mask = tensors(p)
    assume(p["T"] >= 2)  # both pieces non-empty: a zero-length piece is no stream (the layer's callers never make one)
    split = 1 + int(where * (p["T"] - 2))  # 1 .. T-1
    phi_q, phi_k = att.feature_map(q, k)
    with torch.no_grad():
        whole, _ = att.mixer(q, k, v, phi_q, phi_k, key_mask=mask, mode="chunk")
        first, state = att.mixer(q[:, :split], k[:, :split], v[:, :split], phi_q[:, :split], phi_k[:, :split],
                                 key_mask=mask[:, :split], mode="chunk", output_final_state=True)
        rest, _ = att.mixer(q[:, split:], k[:, split:], v[:, split:], phi_q[:, split:], phi_k[:, split:],
                            key_mask=mask[:, split:], state=state, mode="recurrent" if p["T"] - split == 1 else "chunk")
    assert rel(torch.cat([first, rest], 1)[mask], whole[mask]) < TOL


@EXAMPLES
@given(problems(), st.sampled_from([torch.bfloat16, torch.float16]))
def test_half_precision_inputs_stay_close_to_float32(p, dtype):
    att = build(p)
    q, k, v, mask = tensors(p)
    with torch.no_grad():
        half = att.attend(q.to(dtype), k.to(dtype), v.to(dtype), key_mask=mask)
        full = att.attend(q.to(dtype).float(), k.to(dtype).float(), v.to(dtype).float(), key_mask=mask)
    assert half.dtype == dtype and torch.isfinite(half).all()
    assert rel(half.float()[mask], full[mask]) < 2e-2


@EXAMPLES
@given(st.integers(1, 3), st.integers(1, 90), st.integers(1, 4), st.integers(1, 9), st.integers(1, 9),
       st.integers(1, 100), st.integers(0, 2**16))
def test_linear_attention_op_forms_agree_with_a_start_state(B, T, H, F, D, chunk, seed):
    g = torch.Generator().manual_seed(seed)
    phi_q, phi_k = (torch.rand(B, T, H, F, generator=g) for _ in range(2))
    v = torch.randn(B, T, H, D, generator=g)
    start = (torch.rand(B, H, F, D, generator=g), torch.rand(B, H, F, generator=g) + 1)  # (S0, z0)
    out = {mode: linear_attention(phi_q, phi_k, v, mode=mode, chunk_size=chunk, initial_state=start,
                                  output_final_state=True) for mode in ("chunk", "recurrent", "quadratic")}
    for mode in ("chunk", "recurrent"):
        assert rel(out[mode][0], out["quadratic"][0]) < TOL, mode
        for a, b in zip(out[mode][1], out["quadratic"][1]):
            assert rel(a, b) < TOL, mode
