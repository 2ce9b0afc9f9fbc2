"""t2r.ops gated linear attention (GLA) and the gated sliding-window hybrid: the chunked and recurrent forms vs the
quadratic twin (outputs, final state, gradients; mild, strong, -inf and 0 gates), the twins vs the definition, the
extreme gates vs closed forms, the weights for attention transfer, the RNN claim (one call == prefill + token-by-token
decode + prefill, with left padding), validation. CPU, float32, fixed seeds, small shapes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as nnf

import t2r.ops.gla.chunk as gla_chunk
from ops_checks import LENGTHS, MODES, OUT_TOL, assert_close, compare_runs, gen, left_pad_mask, run_with_grads
from t2r.ops import (
    LinearState,
    WindowState,
    gated_linear_attention,
    gated_linear_attention_terms,
    gated_linear_attention_weights,
    linear_attention,
    sliding_window_linear_attention,
)

INF = float("inf")


def log_decays(kind: str, B: int, T: int, H: int, F: int, g: torch.Generator) -> torch.Tensor:
    """mild: decays ~0.95 (as a trained gate starts); strong: ~exp(-5) per step (the plain cumulative trick
    overflows within a chunk); extreme: a mix with 10% -inf (forget) and 10% 0 (keep); head: mild, [B, T, H]."""
    if kind == "head":
        return nnf.logsigmoid(torch.randn(B, T, H, generator=g) + 3)
    if kind == "mild":
        return nnf.logsigmoid(torch.randn(B, T, H, F, generator=g) + 3)
    if kind == "strong":
        return (-5 + 0.5 * torch.randn(B, T, H, F, generator=g)).clamp_max(0)
    x = nnf.logsigmoid(3 * torch.randn(B, T, H, F, generator=g))
    r = torch.rand(B, T, H, F, generator=g)
    return x.masked_fill(r < 0.1, -INF).masked_fill(r > 0.9, 0.0)


def start_valid(B, window):
    valid = torch.ones(B, window, dtype=torch.bool)
    valid[0, : (window + 1) // 2] = False  # row 0 starts mid-stream with a partly empty buffer
    return valid


def assert_states_close(a, b, what: str, tol=OUT_TOL):
    for name, x, y in zip(type(b)._fields, a, b):
        if x.dtype == torch.bool:
            assert torch.equal(x, y), f"{what}: state.{name} differs"
        else:
            assert_close(x, y, tol, f"{what}: state.{name}")


# ---------------------------------------------------------------- gated linear attention


def gla_leaves(B, T, H, F, D, seed, decay="mild", with_state=False):
    g = gen(seed)
    leaves = {
        "phi_q": torch.rand(B, T, H, F, generator=g) + 0.05,  # positive, like most feature maps
        "phi_k": torch.rand(B, T, H, F, generator=g) + 0.05,
        "v": torch.randn(B, T, H, D, generator=g),
        "log_decay": log_decays(decay, B, T, H, F, g),
    }
    if with_state:
        leaves["S0"] = torch.randn(B, H, F, D, generator=g)
        leaves["z0"] = torch.rand(B, H, F, generator=g) * 10 + 1
    return {k: x.requires_grad_() for k, x in leaves.items()}


def gla_call(mode, chunk_size, key_mask=None, **kw):
    def call(x):
        state = LinearState(x["S0"], x["z0"]) if "S0" in x else None
        return gated_linear_attention(x["phi_q"], x["phi_k"], x["v"], x["log_decay"], key_mask=key_mask, mode=mode,
                                      chunk_size=chunk_size, initial_state=state, output_final_state=True, **kw)
    return call


GLA_CASES = [("mild", False, False), ("mild", True, True), ("strong", True, False), ("extreme", True, True),
             ("head", False, True)]  # (decay, with_state, masked)


@pytest.mark.parametrize("mode", ["chunk", "recurrent"])
@pytest.mark.parametrize("decay,with_state,masked", GLA_CASES)
@pytest.mark.parametrize("T,chunk_size", LENGTHS)
def test_gla_matches_quadratic(T, chunk_size, decay, with_state, masked, mode):
    key_mask = left_pad_mask(T, [0, min(5, T)]) if masked else None
    leaves = gla_leaves(2, T, 2, 8, 8, seed=T, decay=decay, with_state=with_state)
    fast = run_with_grads(gla_call(mode, chunk_size, key_mask), leaves)
    ref = run_with_grads(gla_call("quadratic", chunk_size, key_mask), leaves)
    compare_runs(fast, ref, list(leaves))


@pytest.mark.parametrize("T,chunk_size", [(50, 20), (37, 64), (40, 8), (17, 5)])
def test_gla_chunk_sizes_off_the_sub_chunk_grid(T, chunk_size):
    leaves = gla_leaves(1, T, 2, 4, 3, seed=T, decay="extreme", with_state=True)
    fast = run_with_grads(gla_call("chunk", chunk_size), leaves)
    ref = run_with_grads(gla_call("quadratic", chunk_size), leaves)
    compare_runs(fast, ref, list(leaves))


def definition_gla(x, key_mask, eps=1e-6):
    """S_t = diag(exp(g_t)) S_{t-1} + phi_k_t v_t^T token by token, in float64 (independent of t2r.ops)."""
    d = {k: t.detach().double() for k, t in x.items()}
    B, T, H, F = d["phi_q"].shape
    rows, states = [], []
    for b in range(B):
        for h in range(H):
            S = d["S0"][b, h].clone() if "S0" in d else torch.zeros(F, d["v"].shape[-1], dtype=torch.float64)
            z = d["z0"][b, h].clone() if "z0" in d else torch.zeros(F, dtype=torch.float64)
            for t in range(T):
                if key_mask[b, t]:
                    a, k_t = d["log_decay"][b, t, h].exp(), d["phi_k"][b, t, h]
                    S, z = a[:, None] * S + torch.outer(k_t, d["v"][b, t, h]), a * z + k_t
                den = d["phi_q"][b, t, h] @ z
                rows.append(d["phi_q"][b, t, h] @ S / (den + eps if den >= 0 else den - eps))
            states.append(S)
    o = torch.stack(rows).view(B, H, T, -1).transpose(1, 2)
    return o, torch.stack(states).view(B, H, F, -1)


@pytest.mark.parametrize("decay", ["mild", "extreme"])
def test_gla_quadratic_matches_the_definition(decay):
    x = gla_leaves(2, 12, 2, 4, 3, seed=20, decay=decay, with_state=True)
    key_mask = left_pad_mask(12, [0, 3])
    o, state = gla_call("quadratic", 16, key_mask)(x)
    o_def, S_def = definition_gla(x, key_mask)
    assert_close(o, o_def, OUT_TOL, "quadratic vs definition")
    assert_close(state.S, S_def, OUT_TOL, "quadratic S vs definition")


@pytest.mark.parametrize("mode", MODES)
def test_gla_decay_one_is_linear_attention(mode):
    x = {k: t.detach() for k, t in gla_leaves(2, 45, 2, 4, 3, seed=21, with_state=True).items()}
    key_mask = left_pad_mask(45, [0, 4])
    state = LinearState(x["S0"], x["z0"])
    common = dict(key_mask=key_mask, mode=mode, chunk_size=16, initial_state=state, output_final_state=True)
    o, s = gated_linear_attention(x["phi_q"], x["phi_k"], x["v"], torch.zeros(2, 45, 2, 4), **common)
    o_lin, s_lin = linear_attention(x["phi_q"], x["phi_k"], x["v"], **common)
    assert_close(o, o_lin, 1e-6, "g = 0 vs linear attention")
    assert_states_close(s, s_lin, "g = 0 vs linear attention", tol=1e-6)


@pytest.mark.parametrize("mode", MODES)
def test_gla_decay_zero_keeps_only_the_current_token(mode):
    x = gla_leaves(2, 37, 2, 4, 3, seed=22, with_state=True)
    x["log_decay"] = torch.full((2, 37, 2, 4), -INF, requires_grad=True)
    num, den, state = gated_linear_attention_terms(
        x["phi_q"], x["phi_k"], x["v"], x["log_decay"], mode=mode, chunk_size=16,
        initial_state=LinearState(x["S0"], x["z0"]), output_final_state=True)
    qk = (x["phi_q"] * x["phi_k"]).sum(-1)  # [B, T, H]
    assert_close(num, qk.unsqueeze(-1) * x["v"], OUT_TOL, "num at g = -inf")
    assert_close(den, qk, OUT_TOL, "den at g = -inf")
    k_last, v_last = x["phi_k"][:, -1], x["v"][:, -1]  # [B, H, *]
    assert_close(state.S, k_last.unsqueeze(-1) * v_last.unsqueeze(-2), OUT_TOL, "S at g = -inf")
    loss = num.sum() + den.sum() + state.S.sum() + state.z.sum()
    grads = dict(zip(x, torch.autograd.grad(loss, list(x.values()))))
    assert all(torch.isfinite(g).all() for g in grads.values())
    assert torch.equal(grads["log_decay"], torch.zeros_like(grads["log_decay"]))


@pytest.mark.parametrize("mode", MODES)
def test_gla_per_head_decay_is_the_broadcast_one(mode):
    x = gla_leaves(2, 30, 2, 4, 3, seed=23, decay="head", with_state=True)
    outs, _, grads = run_with_grads(gla_call(mode, 8), x)
    y = dict(x, log_decay=x["log_decay"].detach().unsqueeze(-1).expand(2, 30, 2, 4).clone().requires_grad_())
    outs_b, _, grads_b = run_with_grads(gla_call(mode, 8), y)
    for a, b in zip(outs, outs_b):
        assert_close(a, b, 1e-6, "per-head vs broadcast")
    assert_close(grads["log_decay"], grads_b["log_decay"].sum(-1), 1e-5, "per-head gradient")


def test_gla_terms_and_unnormalised_output():
    x = gla_leaves(1, 9, 2, 4, 3, seed=24, decay="strong")
    num, den, state = gated_linear_attention_terms(x["phi_q"], x["phi_k"], x["v"], x["log_decay"], chunk_size=4)
    assert state is None and num.dtype == torch.float32 and den.shape == (1, 9, 2)
    o, _ = gated_linear_attention(x["phi_q"], x["phi_k"], x["v"], x["log_decay"], chunk_size=4, eps=1e-6)
    assert_close(o, num / (den + 1e-6).unsqueeze(-1), 1e-6, "o vs num / den")
    o_num, _ = gated_linear_attention(x["phi_q"], x["phi_k"], x["v"], x["log_decay"], chunk_size=4, normalize=False)
    assert torch.equal(o_num, num)


@pytest.mark.parametrize("decay", ["mild", "extreme"])
@pytest.mark.parametrize("T,chunk_size", [(1, 16), (63, 16), (50, 20), (37, 64)])
def test_gla_weights_give_num_and_den(T, chunk_size, decay):
    x = {k: t.detach() for k, t in gla_leaves(2, T, 2, 4, 3, seed=T + 25, decay=decay).items()}
    key_mask = left_pad_mask(T, [0, min(3, T)])
    A = gated_linear_attention_weights(x["phi_q"], x["phi_k"], x["log_decay"], key_mask=key_mask,
                                       chunk_size=chunk_size)
    num, den, _ = gated_linear_attention_terms(x["phi_q"], x["phi_k"], x["v"], x["log_decay"], key_mask=key_mask,
                                               mode="quadratic")
    assert A.shape == (2, 2, T, T) and A.dtype == torch.float32
    assert torch.equal(A.triu(1), torch.zeros_like(A))
    assert_close(A.sum(-1).transpose(1, 2), den, OUT_TOL, "weights sum vs den")
    assert_close((A @ x["v"].transpose(1, 2)).transpose(1, 2), num, OUT_TOL, "weights @ v vs num")


def test_gla_weights_match_the_definition():
    x = {k: t.detach().double() for k, t in gla_leaves(1, 11, 2, 4, 3, seed=26, decay="extreme").items()}
    A = gated_linear_attention_weights(x["phi_q"], x["phi_k"], x["log_decay"], chunk_size=4)
    expected = torch.zeros(1, 2, 11, 11, dtype=torch.float64)
    for h in range(2):
        for t in range(11):
            for j in range(t + 1):
                decay = x["log_decay"][0, j + 1: t + 1, h].sum(0).exp()  # [F]
                expected[0, h, t, j] = x["phi_q"][0, t, h] @ (decay * x["phi_k"][0, j, h])
    assert A.dtype == torch.float64
    assert_close(A, expected, 1e-12, "weights vs definition")


def gla_pieces(x, key_mask, decode_mode, sizes=(37, 1, 1, 1, 1, 1, 20)):
    """Prefill, decode token by token, prefill again, carrying the state."""
    outs, state, start = [], None, 0
    for n in sizes:
        sl = slice(start, start + n)
        o, state = gated_linear_attention(
            x["phi_q"][:, sl], x["phi_k"][:, sl], x["v"][:, sl], x["log_decay"][:, sl],
            key_mask=None if key_mask is None else key_mask[:, sl], mode=decode_mode if n == 1 else "chunk",
            chunk_size=16, initial_state=state, output_final_state=True)
        outs.append(o)
        start += n
    return torch.cat(outs, 1), state


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("decode_mode", ["chunk", "recurrent"])
def test_gla_is_an_rnn(decode_mode, padded):
    pads, T = [0, 1, 2, 3, 4, 5], 62
    x = {k: t.detach() for k, t in gla_leaves(len(pads), T, 2, 4, 4, seed=27, decay="extreme").items()}
    key_mask = left_pad_mask(T, pads) if padded else None
    if padded:  # padding content must not leak anywhere, not even as NaN
        for name in ("phi_k", "v", "log_decay"):
            x[name] = x[name].masked_fill(~key_mask[:, :, None, None], float("nan"))
    o_full, s_full = gated_linear_attention(x["phi_q"], x["phi_k"], x["v"], x["log_decay"], key_mask=key_mask,
                                            chunk_size=16, output_final_state=True)
    o_pieces, s_pieces = gla_pieces(x, key_mask, decode_mode)
    assert torch.isfinite(o_full).all() and torch.isfinite(o_pieces).all()
    assert_close(o_pieces, o_full, OUT_TOL, "pieces output")
    assert_states_close(s_pieces, s_full, "pieces")
    if padded:
        for b, p in enumerate(pads):
            row = [x[n][b:b + 1, p:] for n in ("phi_q", "phi_k", "v", "log_decay")]
            o_alone, s_alone = gated_linear_attention(*row, chunk_size=16, output_final_state=True)
            assert_close(o_full[b:b + 1, p:], o_alone, OUT_TOL, f"row {b} output vs unpadded")
            assert_states_close(LinearState(*(t[b:b + 1] for t in s_full)), s_alone, f"row {b}")


def test_gla_dtypes():
    x = {k: t.detach() for k, t in gla_leaves(1, 5, 1, 4, 2, seed=28).items()}
    args = [x[n] for n in ("phi_q", "phi_k", "v", "log_decay")]
    o, state = gated_linear_attention(*(t.bfloat16() for t in args), output_final_state=True)
    assert o.dtype == torch.bfloat16 and state.S.dtype == torch.float32 and state.z.dtype == torch.float32
    o, state = gated_linear_attention(*(t.double() for t in args), output_final_state=True)
    assert o.dtype == torch.float64 and state.S.dtype == torch.float64
    S, z = state
    assert S.shape == (1, 1, 4, 2) and z.shape == (1, 1, 4)


# ---------------------------------------------------------------- gated sliding window + linear


def window_leaves(B, T, H, Dk, D, F, window, seed, decay="mild", with_state=False):
    g = gen(seed)
    leaves = {
        "q": torch.randn(B, T, H, Dk, generator=g),
        "k": torch.randn(B, T, H, Dk, generator=g),
        "v": torch.randn(B, T, H, D, generator=g),
        "phi_q": torch.rand(B, T, H, F, generator=g) + 0.05,
        "phi_k": torch.rand(B, T, H, F, generator=g) + 0.05,
        "window_factor": torch.rand(H, generator=g) * 0.8 + 0.1,
        "log_decay": log_decays(decay, B, T, H, F, g),
    }
    if with_state:
        leaves.update(
            S=torch.randn(B, H, F, D, generator=g), z=torch.rand(B, H, F, generator=g) * 10 + 1,
            k_buf=torch.randn(B, H, window, Dk, generator=g), v_buf=torch.randn(B, H, window, D, generator=g),
            phi_k_buf=torch.rand(B, H, window, F, generator=g) + 0.05,
        )
    return {k: x.requires_grad_() for k, x in leaves.items()}


def window_call(mode, chunk_size, window, key_mask=None):
    def call(x):
        state = None
        if "S" in x:
            valid = start_valid(x["q"].shape[0], window)
            state = WindowState(x["S"], x["z"], x["k_buf"], x["v_buf"], x["phi_k_buf"], valid)
        return sliding_window_linear_attention(
            x["q"], x["k"], x["v"], x["phi_q"], x["phi_k"], window=window, window_factor=x["window_factor"],
            scale=x["q"].shape[-1] ** -0.5, log_decay=x.get("log_decay"), key_mask=key_mask, mode=mode,
            chunk_size=chunk_size, initial_state=state, output_final_state=True)
    return call


WINDOW_CASES = [(1, 16, 4), (63, 16, 1), (63, 16, 4), (63, 16, 16), (500, 64, 16), (30, 8, 64)]
WINDOW_GATES = [("mild", False, False), ("strong", True, True), ("extreme", True, False), ("head", False, True)]


@pytest.mark.parametrize("mode", ["chunk", "recurrent"])
@pytest.mark.parametrize("decay,with_state,masked", WINDOW_GATES)
@pytest.mark.parametrize("T,chunk_size,window", WINDOW_CASES)
def test_gated_window_matches_quadratic(T, chunk_size, window, decay, with_state, masked, mode):
    key_mask = left_pad_mask(T, [0, min(5, T)]) if masked else None
    leaves = window_leaves(2, T, 2, 4, 4, 4, window, seed=T + window, decay=decay, with_state=with_state)
    fast = run_with_grads(window_call(mode, chunk_size, window, key_mask), leaves)
    ref = run_with_grads(window_call("quadratic", chunk_size, window, key_mask), leaves)
    compare_runs(fast, ref, list(leaves))


def definition_gated_window(x, window, valid, eps=1e-6):
    """Query by query and key by key, in float64 (independent of t2r.ops): the old key j weighs
    (1 - f) phi_q_t . prod_{j+window<i<=t} exp(g_i) phi_k_j. Buffered tokens sit at positions -window .. -1."""
    d = {k: t.detach().double() for k, t in x.items()}
    q, k, v, pq, pk, lg = d["q"], d["k"], d["v"], d["phi_q"], d["phi_k"], d["log_decay"]
    B, T, H, Dk = q.shape
    P = window if "S" in d else 0
    if P:
        k, v, pk = (torch.cat([d[n].transpose(1, 2), t], 1) for n, t in (("k_buf", k), ("v_buf", v), ("phi_k_buf", pk)))
        valid = torch.cat([start_valid(B, window), valid], 1)
    lg = torch.cat([torch.zeros(B, P, H, lg.shape[-1], dtype=lg.dtype), lg], 1).masked_fill(~valid[..., None, None], 0)
    f, rows = d["window_factor"], []
    for b in range(B):
        for t in range(P, P + T):
            for h in range(H):
                win = [j for j in range(max(0, t - window + 1), t + 1) if valid[b, j]]
                old = [j for j in range(0, t - window + 1) if valid[b, j]]
                s = [Dk ** -0.5 * q[b, t - P, h] @ k[b, j, h] for j in win]
                m = torch.stack(s).max() if s else 0.0
                w = [f[h] * torch.exp(sj - m) for sj in s]
                w += [(1 - f[h]) * pq[b, t - P, h] @ (lg[b, j + window + 1: t + 1, h].sum(0).exp() * pk[b, j, h])
                      for j in old]
                num = sum((wj * v[b, j, h] for wj, j in zip(w, win + old)), torch.zeros(v.shape[-1], dtype=v.dtype))
                den = sum(w, torch.zeros((), dtype=v.dtype))
                if P:
                    q_S0 = pq[b, t - P, h] * lg[b, P: t + 1, h].sum(0).exp()  # the initial state decays from step 0
                    num, den = num + (1 - f[h]) * q_S0 @ d["S"][b, h], den + (1 - f[h]) * q_S0 @ d["z"][b, h]
                rows.append(num / (den + eps if den >= 0 else den - eps))
    return torch.stack(rows).view(B, T, H, -1)


@pytest.mark.parametrize("with_state", [False, True])
def test_gated_window_quadratic_matches_the_definition(with_state):
    T, window = 12, 3
    x = window_leaves(2, T, 2, 4, 3, 5, window, seed=30, decay="extreme", with_state=with_state)
    key_mask = left_pad_mask(T, [0, 3])
    o, _ = window_call("quadratic", 8, window, key_mask)(x)
    assert_close(o, definition_gated_window(x, window, key_mask), OUT_TOL, "quadratic vs definition")


@pytest.mark.parametrize("mode", MODES)
def test_gated_window_with_decay_one_is_the_plain_window(mode):
    x = {k: t.detach() for k, t in window_leaves(2, 40, 2, 4, 3, 5, 6, seed=31, with_state=True).items()}
    key_mask = left_pad_mask(40, [0, 4])
    x["log_decay"] = torch.zeros(2, 40, 2)
    o, s = window_call(mode, 16, 6, key_mask)(x)
    o_plain, s_plain = window_call(mode, 16, 6, key_mask)({k: t for k, t in x.items() if k != "log_decay"})
    assert_close(o, o_plain, 1e-6, "g = 0 vs ungated")
    assert_states_close(s, s_plain, "g = 0 vs ungated", tol=1e-6)


def window_pieces(x, key_mask, decode_mode, window, sizes=(37, 1, 1, 1, 1, 1, 20)):
    outs, state, start = [], None, 0
    for n in sizes:
        sl = slice(start, start + n)
        piece = {k: (t[:, sl] if t.dim() == 4 else t) for k, t in x.items()}
        o, state = sliding_window_linear_attention(
            piece["q"], piece["k"], piece["v"], piece["phi_q"], piece["phi_k"], window=window,
            window_factor=x["window_factor"], scale=0.5, log_decay=piece["log_decay"],
            key_mask=None if key_mask is None else key_mask[:, sl], mode=decode_mode if n == 1 else "chunk",
            chunk_size=16, initial_state=state, output_final_state=True)
        outs.append(o)
        start += n
    return torch.cat(outs, 1), state


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("decode_mode", ["chunk", "recurrent"])
def test_gated_window_is_an_rnn(decode_mode, padded):
    pads, T, window = [0, 1, 2, 3, 4, 5], 62, 8
    x = {k: t.detach() for k, t in window_leaves(6, T, 2, 4, 4, 4, window, seed=32, decay="extreme").items()}
    key_mask = left_pad_mask(T, pads) if padded else None
    if padded:  # padding content must not leak anywhere, not even as NaN
        for name in ("k", "v", "phi_k", "log_decay"):
            x[name] = x[name].masked_fill(~key_mask[:, :, None, None], float("nan"))
    call = dict(window=window, window_factor=x["window_factor"], scale=0.5, key_mask=key_mask, chunk_size=16,
                output_final_state=True)
    rows = ("q", "k", "v", "phi_q", "phi_k")
    o_full, s_full = sliding_window_linear_attention(*(x[n] for n in rows), log_decay=x["log_decay"], **call)
    o_pieces, s_pieces = window_pieces(x, key_mask, decode_mode, window)
    assert torch.isfinite(o_full).all() and torch.isfinite(o_pieces).all()
    assert_close(o_pieces, o_full, OUT_TOL, "pieces output")
    assert_states_close(s_pieces, s_full, "pieces")
    if padded:
        call.update(key_mask=None)
        for b, p in enumerate(pads):
            row = [x[n][b:b + 1, p:] for n in rows]
            o_alone, s_alone = sliding_window_linear_attention(*row, log_decay=x["log_decay"][b:b + 1, p:], **call)
            assert_close(o_full[b:b + 1, p:], o_alone, OUT_TOL, f"row {b} output vs unpadded")
            assert_states_close(WindowState(*(t[b:b + 1] for t in s_full)), s_alone, f"row {b}")


# ---------------------------------------------------------------- validation


def _gla(**over):
    x = dict(phi_q=torch.rand(1, 4, 2, 3), phi_k=torch.rand(1, 4, 2, 3), v=torch.rand(1, 4, 2, 5),
             log_decay=torch.zeros(1, 4, 2, 3))
    kw = {k: over.pop(k) for k in list(over) if k not in x}
    x.update(over)
    return lambda: gated_linear_attention(x["phi_q"], x["phi_k"], x["v"], x["log_decay"], **kw)


def _weights(**over):
    x = dict(phi_q=torch.rand(1, 4, 2, 3), phi_k=torch.rand(1, 4, 2, 3), log_decay=torch.zeros(1, 4, 2))
    kw = {k: over.pop(k) for k in list(over) if k not in x}
    x.update(over)
    return lambda: gated_linear_attention_weights(x["phi_q"], x["phi_k"], x["log_decay"], **kw)


def _win(**over):
    x = dict(q=torch.rand(1, 4, 2, 6), k=torch.rand(1, 4, 2, 6), v=torch.rand(1, 4, 2, 5),
             phi_q=torch.rand(1, 4, 2, 3), phi_k=torch.rand(1, 4, 2, 3))
    kw = dict(window=2, window_factor=torch.full((2,), 0.5), scale=0.4)
    kw.update(over)
    return lambda: sliding_window_linear_attention(x["q"], x["k"], x["v"], x["phi_q"], x["phi_k"], **kw)


@pytest.mark.parametrize("call,message", [
    (_gla(log_decay=torch.zeros(1, 4, 2, 4)), r"log_decay must be a float tensor of shape \(1, 4, 2, 3\) or"),
    (_gla(log_decay=torch.zeros(1, 4, 2)[:, :3]), r"log_decay .* got torch.float32 \(1, 3, 2\)"),
    (_gla(log_decay=torch.zeros(1, 4, 2, 3, dtype=torch.long)), "log_decay must be a float tensor"),
    (_gla(log_decay=0.0), "log_decay must be a float tensor"),
    (_gla(phi_q=torch.rand(4, 2, 3)), "phi_q must be a 4-d tensor"),
    (_gla(v=torch.rand(1, 5, 2, 5)), r"phi_q and v must agree on \[B, T, H\]"),
    (_gla(phi_k=torch.rand(1, 4, 2, 4)), "same feature size"),
    (_gla(mode="fast"), "known modes: chunk, recurrent, quadratic"),
    (_gla(chunk_size=0), "chunk_size must be a positive int"),
    (_gla(key_mask=torch.ones(1, 4)), "key_mask must be a bool tensor"),
    (_gla(initial_state=(torch.zeros(1, 2, 3, 4), torch.zeros(1, 2, 3))), r"initial_state.S must have shape"),
    (_weights(log_decay=torch.zeros(1, 4, 3)), "log_decay must be a float tensor of shape"),
    (_weights(phi_k=torch.rand(1, 4, 2, 2)), "same feature size"),
    (_weights(chunk_size=-1), "chunk_size must be a positive int"),
    (_win(log_decay=torch.zeros(1, 4, 2, 6)), r"log_decay must be a float tensor of shape \(1, 4, 2, 3\)"),
    (_win(log_decay=torch.zeros(1, 4, 2, 3, dtype=torch.bool)), "log_decay must be a float tensor"),
])
def test_validation_errors(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_valid_calls_pass_validation():
    _gla(log_decay=torch.zeros(1, 4, 2), key_mask=torch.ones(1, 4, dtype=torch.bool))()
    _weights()()
    _win(log_decay=torch.full((1, 4, 2), -INF))()
    _win(log_decay=None)()


def test_the_fast_within_chunk_product_equals_the_blockwise_form(monkeypatch):
    """Mild decays take the one-product path; forcing the blockwise form on the same inputs changes nothing."""
    g = gen(5)
    phi_q, phi_k = (torch.rand(2, 150, 3, 6, generator=g) for _ in range(2))
    v = torch.randn(2, 150, 3, 5, generator=g)
    log_decay = nnf.logsigmoid(torch.randn(2, 150, 3, 6, generator=g) + 4)
    fast, fast_state = gated_linear_attention(phi_q, phi_k, v, log_decay, chunk_size=64, output_final_state=True)
    monkeypatch.setattr(gla_chunk, "SAFE_LOG_DECAY", float("inf"))  # no chunk qualifies
    slow, slow_state = gated_linear_attention(phi_q, phi_k, v, log_decay, chunk_size=64, output_final_state=True)
    assert_close(fast, slow, OUT_TOL, "output")
    assert_close(fast_state.S, slow_state.S, OUT_TOL, "state")
