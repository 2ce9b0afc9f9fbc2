"""t2r.ops: fast paths vs their quadratic twins (outputs, final state, gradients), the RNN claim
(one call == prefill + token-by-token decode + prefill, with left padding), the guard, validation.
CPU, float32, fixed seeds, small shapes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import t2r.ops
from ops_checks import (
    GRAD_ATOL,
    GRAD_TOL,
    LENGTHS,
    OUT_TOL,
    assert_close,
    compare_runs,
    gen,
    left_pad_mask,
    run_with_grads,
)
from t2r.ops import (
    LinearState,
    WindowState,
    linear_attention,
    linear_attention_terms,
    sliding_window_linear_attention,
)

# ---------------------------------------------------------------- op 1: linear attention


def linear_leaves(B, T, H, F, D, seed, with_state):
    g = gen(seed)
    leaves = {
        "phi_q": torch.rand(B, T, H, F, generator=g) + 0.05,  # positive, like most feature maps
        "phi_k": torch.rand(B, T, H, F, generator=g) + 0.05,
        "v": torch.randn(B, T, H, D, generator=g),
    }
    if with_state:
        leaves["S0"] = torch.randn(B, H, F, D, generator=g)
        leaves["z0"] = torch.rand(B, H, F, generator=g) * 10 + 1
    return {k: x.requires_grad_() for k, x in leaves.items()}


def linear_call(mode, chunk_size, **kw):
    def call(x):
        state = LinearState(x["S0"], x["z0"]) if "S0" in x else None
        return linear_attention(x["phi_q"], x["phi_k"], x["v"], mode=mode, chunk_size=chunk_size,
                                initial_state=state, output_final_state=True, **kw)
    return call


@pytest.mark.parametrize("mode", ["chunk", "recurrent"])
@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("T,chunk_size", LENGTHS)
def test_linear_matches_quadratic(T, chunk_size, with_state, mode):
    leaves = linear_leaves(2, T, 2, 8, 8, seed=T, with_state=with_state)
    fast = run_with_grads(linear_call(mode, chunk_size), leaves)
    ref = run_with_grads(linear_call("quadratic", chunk_size), leaves)
    compare_runs(fast, ref, list(leaves))


def test_linear_terms_are_the_unnormalised_output():
    x = linear_leaves(1, 9, 2, 4, 3, seed=1, with_state=False)
    num, den, state = linear_attention_terms(x["phi_q"], x["phi_k"], x["v"], chunk_size=4)
    o, _ = linear_attention(x["phi_q"], x["phi_k"], x["v"], chunk_size=4, eps=1e-6)
    assert state is None and num.dtype == torch.float32 and den.shape == (1, 9, 2)
    assert_close(o, num / (den + 1e-6).unsqueeze(-1), 1e-6, "o vs num / den")


def test_linear_noncausal_matches_direct_formula():
    x = linear_leaves(2, 11, 2, 4, 3, seed=2, with_state=True)
    eps = 1e-6
    A = torch.einsum("bthf,bshf->bhts", x["phi_q"], x["phi_k"])  # full, unmasked
    num = torch.einsum("bhts,bshd->bthd", A, x["v"]) + torch.einsum("bthf,bhfd->bthd", x["phi_q"], x["S0"])
    den = A.sum(-1).transpose(1, 2) + torch.einsum("bthf,bhf->bth", x["phi_q"], x["z0"])
    S = x["S0"] + torch.einsum("bthf,bthd->bhfd", x["phi_k"], x["v"])
    for mode in ("chunk", "recurrent", "quadratic"):  # mode is ignored
        o, state = linear_attention(x["phi_q"], x["phi_k"], x["v"], causal=False, mode=mode, chunk_size=4,
                                    initial_state=(x["S0"], x["z0"]), output_final_state=True, eps=eps)
        assert_close(o, num / (den + eps).unsqueeze(-1), OUT_TOL, f"non-causal output ({mode})")
        assert_close(state.S, S, OUT_TOL, "non-causal S")
        assert_close(state.z, x["z0"] + x["phi_k"].sum(1), OUT_TOL, "non-causal z")


def linear_pieces(phi_q, phi_k, v, decode_mode, sizes=(37, 1, 1, 1, 1, 1, 20)):
    """Prefill, decode token by token, prefill again, carrying the state."""
    outs, state, start = [], None, 0
    for n in sizes:
        mode = decode_mode if n == 1 else "chunk"
        sl = slice(start, start + n)
        o, state = linear_attention(phi_q[:, sl], phi_k[:, sl], v[:, sl], mode=mode, chunk_size=16,
                                    initial_state=state, output_final_state=True)
        outs.append(o)
        start += n
    return torch.cat(outs, 1), state


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("decode_mode", ["chunk", "recurrent"])
def test_linear_is_an_rnn(decode_mode, padded):
    pads = [0, 1, 2, 3, 4, 5]
    x = {k: t.detach() for k, t in linear_leaves(len(pads), 62, 2, 4, 4, seed=3, with_state=False).items()}
    phi_k = x["phi_k"]
    if padded:  # without a key_mask, padding means phi_k = 0 at the padded steps (the caller's job)
        phi_k = phi_k * left_pad_mask(62, pads)[:, :, None, None]
    o_full, s_full = linear_attention(x["phi_q"], phi_k, x["v"], chunk_size=16, output_final_state=True)
    o_pieces, s_pieces = linear_pieces(x["phi_q"], phi_k, x["v"], decode_mode)
    assert_close(o_pieces, o_full, OUT_TOL, "pieces output")
    assert_close(s_pieces.S, s_full.S, OUT_TOL, "pieces S")
    assert_close(s_pieces.z, s_full.z, OUT_TOL, "pieces z")
    if padded:
        for b, p in enumerate(pads):
            o_alone, s_alone = linear_attention(x["phi_q"][b:b + 1, p:], x["phi_k"][b:b + 1, p:],
                                                x["v"][b:b + 1, p:], chunk_size=16, output_final_state=True)
            assert_close(o_full[b:b + 1, p:], o_alone, OUT_TOL, f"row {b} output vs unpadded")
            assert_close(s_full.S[b:b + 1], s_alone.S, OUT_TOL, f"row {b} S vs unpadded")


@pytest.mark.parametrize("mode", ["chunk", "recurrent", "quadratic"])
def test_linear_zero_denominator_gives_zero(mode):
    phi_q = torch.zeros(1, 5, 2, 4, requires_grad=True)
    phi_k = torch.rand(1, 5, 2, 4)
    v = torch.randn(1, 5, 2, 3)
    o, _ = linear_attention(phi_q, phi_k, v, mode=mode, chunk_size=2)
    assert torch.equal(o, torch.zeros_like(o))
    (grad,) = torch.autograd.grad(o.sum(), phi_q)
    assert torch.isfinite(grad).all()


@pytest.mark.parametrize("mode", ["chunk", "recurrent", "quadratic"])
def test_linear_guard_keeps_the_sign(mode):
    # one feature, one token: num = phi_q phi_k v, den = phi_q phi_k; eps large to see the guard
    phi_k = torch.ones(1, 1, 1, 1)
    v = torch.ones(1, 1, 1, 1)
    for q, expected in ((-1.0, -1.0 / (-1.0 - 0.5)), (1.0, 1.0 / 1.5), (0.0, 0.0)):
        o, _ = linear_attention(torch.full((1, 1, 1, 1), q), phi_k, v, mode=mode, eps=0.5)
        assert o.item() == pytest.approx(expected), f"phi_q={q}"


def test_linear_output_dtype_follows_v_and_state_is_at_least_float32():
    x = linear_leaves(1, 5, 1, 4, 2, seed=4, with_state=False)
    o, state = linear_attention(x["phi_q"].bfloat16(), x["phi_k"].bfloat16(), x["v"].bfloat16(), output_final_state=True)
    assert o.dtype == torch.bfloat16 and state.S.dtype == torch.float32 and state.z.dtype == torch.float32
    o, state = linear_attention(x["phi_q"].double(), x["phi_k"].double(), x["v"].double(), output_final_state=True)
    assert o.dtype == torch.float64 and state.S.dtype == torch.float64  # float64 (parity checks) stays float64
    S, z = state  # unpacks as (S, z)
    assert S.shape == (1, 1, 4, 2) and z.shape == (1, 1, 4)


# ---------------------------------------------------------------- op 2: sliding window + linear


def window_leaves(B, T, H, Dk, D, F, window, seed, with_state):
    g = gen(seed)
    leaves = {
        "q": torch.randn(B, T, H, Dk, generator=g),
        "k": torch.randn(B, T, H, Dk, generator=g),
        "v": torch.randn(B, T, H, D, generator=g),
        "phi_q": torch.rand(B, T, H, F, generator=g) + 0.05,
        "phi_k": torch.rand(B, T, H, F, generator=g) + 0.05,
        "window_factor": torch.rand(H, generator=g) * 0.8 + 0.1,
    }
    if with_state:
        leaves.update(
            S=torch.randn(B, H, F, D, generator=g), z=torch.rand(B, H, F, generator=g) * 10 + 1,
            k_buf=torch.randn(B, H, window, Dk, generator=g), v_buf=torch.randn(B, H, window, D, generator=g),
            phi_k_buf=torch.rand(B, H, window, F, generator=g) + 0.05,
        )
    return {k: x.requires_grad_() for k, x in leaves.items()}


def start_valid(B, window):
    valid = torch.ones(B, window, dtype=torch.bool)
    valid[0, : (window + 1) // 2] = False  # row 0 starts mid-stream with a partly empty buffer
    return valid


def window_call(mode, chunk_size, window, key_mask=None, **kw):
    def call(x):
        state = None
        if "S" in x:
            valid = start_valid(x["q"].shape[0], window)
            state = WindowState(x["S"], x["z"], x["k_buf"], x["v_buf"], x["phi_k_buf"], valid)
        return sliding_window_linear_attention(
            x["q"], x["k"], x["v"], x["phi_q"], x["phi_k"], window=window, window_factor=x["window_factor"],
            scale=x["q"].shape[-1] ** -0.5, key_mask=key_mask, mode=mode, chunk_size=chunk_size,
            initial_state=state, output_final_state=True, **kw)
    return call


WINDOW_CASES = [(T, c, w) for (T, c), w in zip(LENGTHS, (4, 8, 24))] + [(63, 16, 1), (40, 16, 40), (30, 8, 64)]


@pytest.mark.parametrize("mode", ["chunk", "recurrent"])
@pytest.mark.parametrize("with_state,masked", [(False, False), (True, False), (False, True), (True, True)])
@pytest.mark.parametrize("T,chunk_size,window", WINDOW_CASES)
def test_window_matches_quadratic(T, chunk_size, window, with_state, masked, mode):
    B = 2
    key_mask = left_pad_mask(T, [0, min(5, T)]) if masked else None
    leaves = window_leaves(B, T, 2, 8, 8, 8, window, seed=T + window, with_state=with_state)
    fast = run_with_grads(window_call(mode, chunk_size, window, key_mask), leaves)
    ref = run_with_grads(window_call("quadratic", chunk_size, window, key_mask), leaves)
    compare_runs(fast, ref, list(leaves))


def naive_window_attention(x, window, valid, eps=1e-6):
    """The definition, query by query and key by key, in float64 (independent of t2r.ops).

    Buffered tokens (when x holds a state) sit at positions -window .. -1 before the new ones."""
    d = {k: t.double() for k, t in x.items()}
    q, k, v, pq, pk = d["q"], d["k"], d["v"], d["phi_q"], d["phi_k"]
    B, T, H, Dk = q.shape
    P = window if "S" in d else 0
    if P:  # prepend the buffers; the state's own valid flags come first
        k, v, pk = (torch.cat([d[n].transpose(1, 2), t], 1) for n, t in (("k_buf", k), ("v_buf", v), ("phi_k_buf", pk)))
        valid = torch.cat([start_valid(B, window), valid], 1)
    f, rows = d["window_factor"], []
    for b in range(B):
        for t in range(P, P + T):
            for h in range(H):
                win = [j for j in range(max(0, t - window + 1), t + 1) if valid[b, j]]
                old = [j for j in range(0, t - window + 1) if valid[b, j]]
                s = [Dk ** -0.5 * q[b, t - P, h] @ k[b, j, h] for j in win]
                m = torch.stack(s).max() if s else 0.0
                w = [f[h] * torch.exp(sj - m) for sj in s] + [(1 - f[h]) * pq[b, t - P, h] @ pk[b, j, h] for j in old]
                num = sum((wj * v[b, j, h] for wj, j in zip(w, win + old)), torch.zeros(v.shape[-1], dtype=v.dtype))
                den = sum(w, torch.zeros((), dtype=v.dtype))
                if P:
                    num = num + (1 - f[h]) * pq[b, t - P, h] @ d["S"][b, h]
                    den = den + (1 - f[h]) * pq[b, t - P, h] @ d["z"][b, h]
                rows.append(num / (den + eps if den >= 0 else den - eps))
    return torch.stack(rows).view(B, T, H, -1)


@pytest.mark.parametrize("with_state", [False, True])
def test_window_quadratic_matches_the_definition(with_state):
    T, window = 12, 4
    x = window_leaves(2, T, 2, 4, 3, 5, window, seed=10, with_state=with_state)
    key_mask = left_pad_mask(T, [0, 3])
    o, _ = window_call("quadratic", 8, window, key_mask)(x)
    expected = naive_window_attention(x, window, key_mask)
    assert_close(o, expected, OUT_TOL, "quadratic vs definition")
    w = torch.randn(o.shape, generator=gen(11), dtype=torch.float64)
    grads = torch.autograd.grad((o * w).sum(), list(x.values()))
    grads_def = torch.autograd.grad((expected * w).sum(), list(x.values()))
    for name, g, g_def in zip(x, grads, grads_def):
        assert_close(g, g_def, GRAD_TOL, f"grad {name} vs definition", GRAD_ATOL, o.numel())


def test_window_of_one_is_self_plus_linear_over_the_past():
    x = {k: t.detach() for k, t in window_leaves(2, 30, 2, 4, 3, 5, 1, seed=5, with_state=False).items()}
    f = x["window_factor"]
    o, _ = window_call("chunk", 8, 1)(x)
    A = torch.einsum("bthf,bshf->bhts", x["phi_q"], x["phi_k"]).tril(-1)  # strictly older keys
    A = (1 - f)[None, :, None, None] * A  # [B, H, T, T]
    num = f[:, None] * x["v"] + torch.einsum("bhts,bshd->bthd", A, x["v"])
    den = f + A.sum(-1).transpose(1, 2)
    assert_close(o, num / (den + 1e-6).unsqueeze(-1), OUT_TOL, "window=1 output")


@pytest.mark.parametrize("mode", ["chunk", "recurrent", "quadratic"])
def test_window_covering_the_sequence_is_softmax_attention(mode):
    x = {k: t.detach() for k, t in window_leaves(2, 30, 2, 4, 3, 5, 32, seed=6, with_state=False).items()}
    o, _ = window_call(mode, 8, 32)(x)
    scores = torch.einsum("bthd,bshd->bhts", x["q"], x["k"]) * 4 ** -0.5
    scores = scores.masked_fill(~torch.ones(30, 30, dtype=torch.bool).tril(), float("-inf"))
    expected = torch.einsum("bhts,bshd->bthd", scores.softmax(-1), x["v"])
    assert_close(o, expected, OUT_TOL, "window >= T output")


def window_pieces(x, key_mask, decode_mode, window, sizes=(37, 1, 1, 1, 1, 1, 20)):
    outs, state, start = [], None, 0
    for n in sizes:
        sl = slice(start, start + n)
        piece = {k: (t[:, sl] if t.dim() == 4 else t) for k, t in x.items()}
        mode = decode_mode if n == 1 else "chunk"
        mask = None if key_mask is None else key_mask[:, sl]
        o, state = sliding_window_linear_attention(
            piece["q"], piece["k"], piece["v"], piece["phi_q"], piece["phi_k"], window=window,
            window_factor=x["window_factor"], scale=0.5, key_mask=mask, mode=mode, chunk_size=16,
            initial_state=state, output_final_state=True)
        outs.append(o)
        start += n
    return torch.cat(outs, 1), state


def assert_states_close(a: WindowState, b: WindowState, what: str):
    for name, x, y in zip(WindowState._fields, a, b):
        if x.dtype == torch.bool:
            assert torch.equal(x, y), f"{what}: state.{name} differs"
        else:
            assert_close(x, y, OUT_TOL, f"{what}: state.{name}")


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("decode_mode", ["chunk", "recurrent"])
def test_window_is_an_rnn(decode_mode, padded):
    pads, T, window = [0, 1, 2, 3, 4, 5], 62, 8
    x = {k: t.detach() for k, t in window_leaves(6, T, 2, 4, 4, 4, window, seed=7, with_state=False).items()}
    key_mask = left_pad_mask(T, pads) if padded else None
    if padded:  # padding content must not leak anywhere, not even as NaN
        for name in ("k", "v", "phi_k"):
            x[name] = x[name].masked_fill(~key_mask[:, :, None, None], float("nan"))
    call = dict(window=window, window_factor=x["window_factor"], scale=0.5, key_mask=key_mask, chunk_size=16,
                output_final_state=True)
    o_full, s_full = sliding_window_linear_attention(x["q"], x["k"], x["v"], x["phi_q"], x["phi_k"], **call)
    o_pieces, s_pieces = window_pieces(x, key_mask, decode_mode, window)
    assert torch.isfinite(o_full).all() and torch.isfinite(o_pieces).all()
    assert_close(o_pieces, o_full, OUT_TOL, "pieces output")
    assert_states_close(s_pieces, s_full, "pieces")
    if padded:
        call.update(key_mask=None)
        for b, p in enumerate(pads):
            row = [x[n][b:b + 1, p:] for n in ("q", "k", "v", "phi_q", "phi_k")]
            o_alone, s_alone = sliding_window_linear_attention(*row, **call)
            assert_close(o_full[b:b + 1, p:], o_alone, OUT_TOL, f"row {b} output vs unpadded")
            assert_states_close(WindowState(*(t[b:b + 1] for t in s_full)), s_alone, f"row {b}")


@pytest.mark.parametrize("mode", ["chunk", "recurrent", "quadratic"])
def test_window_empty_query_gives_zero(mode):
    x = window_leaves(2, 6, 2, 4, 3, 5, 3, seed=8, with_state=False)
    key_mask = torch.tensor([[False] * 6, [False, False, True, True, True, True]])
    o, _ = window_call(mode, 4, 3, key_mask)(x)
    assert torch.isfinite(o).all()
    assert torch.equal(o[0], torch.zeros_like(o[0])) and torch.equal(o[1, :2], torch.zeros_like(o[1, :2]))
    grads = torch.autograd.grad(o.sum(), list(x.values()))
    assert all(torch.isfinite(g).all() for g in grads)


def test_window_state_layout_and_dtypes():
    x = {k: t.detach() for k, t in window_leaves(2, 3, 2, 4, 3, 5, 6, seed=9, with_state=False).items()}
    o, state = window_call("chunk", 4, 6)(x)
    assert o.shape == (2, 3, 2, 3) and state._fields == ("S", "z", "k", "v", "phi_k", "valid")
    assert state.k.shape == (2, 2, 6, 4) and state.phi_k.dtype == torch.float32
    assert state.valid.tolist() == [[False, False, False, True, True, True]] * 2  # left-padded buffer


# ---------------------------------------------------------------- validation


def _lin(**over):
    x = dict(phi_q=torch.rand(1, 4, 2, 3), phi_k=torch.rand(1, 4, 2, 3), v=torch.rand(1, 4, 2, 5))
    kw = {k: over.pop(k) for k in list(over) if k not in x}
    x.update(over)
    return lambda: linear_attention(x["phi_q"], x["phi_k"], x["v"], **kw)


def _win(**over):
    x = dict(q=torch.rand(1, 4, 2, 6), k=torch.rand(1, 4, 2, 6), v=torch.rand(1, 4, 2, 5),
             phi_q=torch.rand(1, 4, 2, 3), phi_k=torch.rand(1, 4, 2, 3))
    kw = dict(window=2, window_factor=torch.full((2,), 0.5), scale=0.4)
    kw.update({k: over.pop(k) for k in list(over) if k not in x})
    x.update(over)
    return lambda: sliding_window_linear_attention(x["q"], x["k"], x["v"], x["phi_q"], x["phi_k"], **kw)


def _good_window_state(**over):
    s = dict(S=torch.zeros(1, 2, 3, 5), z=torch.zeros(1, 2, 3), k=torch.zeros(1, 2, 2, 6), v=torch.zeros(1, 2, 2, 5),
             phi_k=torch.zeros(1, 2, 2, 3), valid=torch.ones(1, 2, dtype=torch.bool))
    s.update(over)
    return WindowState(**s)


@pytest.mark.parametrize("call,message", [
    (_lin(phi_q=torch.rand(4, 2, 3)), "phi_q must be a 4-d tensor"),
    (_lin(v=torch.rand(1, 5, 2, 5)), r"phi_q and v must agree on \[B, T, H\]"),
    (_lin(phi_k=torch.rand(1, 4, 2, 4)), "same feature size"),
    (_lin(mode="fast"), "known modes: chunk, recurrent, quadratic"),
    (_lin(chunk_size=0), "chunk_size must be a positive int"),
    (_lin(initial_state=(torch.zeros(1, 2, 3, 4), torch.zeros(1, 2, 3))), r"initial_state.S must have shape \(1, 2, 3, 5\)"),
    (_lin(initial_state=torch.zeros(1, 2, 3, 5)), "initial_state must be a LinearState"),
    (_win(window=0), "window must be an int >= 1"),
    (_win(window_factor=torch.full((3,), 0.5)), r"window_factor must be a tensor of shape \(2,\)"),
    (_win(key_mask=torch.ones(1, 4)), "key_mask must be a bool tensor"),
    (_win(key_mask=torch.ones(1, 3, dtype=torch.bool)), r"shape \(1, 4\)"),
    (_win(k=torch.rand(1, 4, 2, 7)), "q and k must have the same feature size"),
    (_win(phi_k=torch.rand(1, 4, 3, 3)), r"q and phi_k must agree on \[B, T, H\]"),
    (_win(mode="softmax"), "known modes"),
    (_win(initial_state=_good_window_state(k=torch.zeros(1, 2, 3, 6))), r"initial_state.k must have shape \(1, 2, 2, 6\)"),
    (_win(initial_state=_good_window_state(valid=torch.ones(1, 2))), "initial_state.valid must be a bool tensor"),
])
def test_validation_errors(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_valid_calls_pass_validation():
    _lin(initial_state=(torch.zeros(1, 2, 3, 5), torch.zeros(1, 2, 3)))()
    _win(initial_state=_good_window_state(), key_mask=torch.ones(1, 4, dtype=torch.bool))()


def test_ops_depend_on_torch_only():
    """t2r.ops itself imports no transformers (t2r/__init__.py is bypassed: it may load the adapters)."""
    package_dir = str(Path(t2r.ops.__file__).resolve().parents[1])
    code = (
        "import sys, types; pkg = types.ModuleType('t2r'); pkg.__path__ = [sys.argv[1]]; "
        "sys.modules['t2r'] = pkg; import t2r.ops; "
        "assert 'transformers' not in sys.modules, 't2r.ops imported transformers'"
    )
    subprocess.run([sys.executable, "-c", code, package_dir], check=True)
