"""t2r.ops delta rule (DeltaNet / Gated DeltaNet) and its sliding-window hybrid: the chunked and quadratic forms vs the
token loop (outputs, final state, gradients), the extreme gates vs closed forms, the RNN claim (one call == prefill +
token-by-token decode + prefill, with left padding), the weights matrix, validation. CPU, float32, fixed seeds."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as nnf

from ops_checks import LENGTHS, MODES, OUT_TOL, assert_close, compare_runs, gen, left_pad_mask, run_with_grads
from t2r.ops import DeltaState, DeltaWindowState, delta_rule, delta_rule_weights, sliding_window_delta_rule


def unit(x: torch.Tensor) -> torch.Tensor:
    return nnf.normalize(x, dim=-1)


# ---------------------------------------------------------------- the delta rule


def delta_leaves(B, T, H, F, D, seed, gated, with_state):
    g = gen(seed)
    leaves = {
        "q": unit(torch.randn(B, T, H, F, generator=g)),
        "k": unit(torch.randn(B, T, H, F, generator=g)),
        "v": torch.randn(B, T, H, D, generator=g),
        "beta": torch.rand(B, T, H, generator=g),
    }
    if gated:
        leaves["log_decay"] = nnf.logsigmoid(torch.randn(B, T, H, generator=g) + 2)  # decays mostly in (0.5, 1)
    if with_state:
        leaves["S0"] = torch.randn(B, H, F, D, generator=g)
    return {k: x.requires_grad_() for k, x in leaves.items()}


def delta_call(mode, chunk_size=16, key_mask=None):
    def call(x):
        state = DeltaState(x["S0"]) if "S0" in x else None
        return delta_rule(x["q"], x["k"], x["v"], x["beta"], log_decay=x.get("log_decay"), key_mask=key_mask,
                          mode=mode, chunk_size=chunk_size, initial_state=state, output_final_state=True)
    return call


@pytest.mark.parametrize("mode", ["chunk", "quadratic"])
@pytest.mark.parametrize("gated,with_state", [(False, False), (False, True), (True, False), (True, True)])
@pytest.mark.parametrize("T,chunk_size", LENGTHS)
def test_delta_matches_recurrent(T, chunk_size, gated, with_state, mode):
    leaves = delta_leaves(2, T, 2, 8, 8, seed=T + 2 * gated + with_state, gated=gated, with_state=with_state)
    fast = run_with_grads(delta_call(mode, chunk_size), leaves)
    ref = run_with_grads(delta_call("recurrent", chunk_size), leaves)
    compare_runs(fast, ref, list(leaves))


@pytest.mark.parametrize("mode", ["chunk", "quadratic"])
def test_zero_decay_steps_match_recurrent_without_nan(mode):
    T = 63
    leaves = delta_leaves(2, T, 2, 8, 8, seed=20, gated=True, with_state=True)
    dead = (torch.arange(T) % 7 == 3) | ((torch.arange(T) >= 14) & (torch.arange(T) < 19))  # also across a chunk edge
    with torch.no_grad():
        leaves["log_decay"][:, dead] = float("-inf")
    fast = run_with_grads(delta_call(mode, 16), leaves)
    ref = run_with_grads(delta_call("recurrent", 16), leaves)
    assert all(torch.isfinite(x).all() for x in fast[0]), "non-finite output or state"
    compare_runs(fast, ref, list(leaves))


def _plain(x):
    return {k: t.detach() for k, t in x.items()}


@pytest.mark.parametrize("mode", MODES)
def test_beta_zero_keeps_the_state(mode):
    x = _plain(delta_leaves(2, 37, 2, 6, 5, seed=21, gated=True, with_state=True))
    x["beta"] = torch.zeros_like(x["beta"])
    o, state = delta_call(mode, 8)(x)
    gamma = x["log_decay"].cumsum(1).exp()  # [B, T, H]  decay from the start to t
    expected = gamma.unsqueeze(-1) * torch.einsum("bthf,bhfd->bthd", x["q"], x["S0"])
    assert_close(o, expected, OUT_TOL, "beta = 0 output")
    assert_close(state.S, gamma[:, -1, :, None, None] * x["S0"], OUT_TOL, "beta = 0 state")


@pytest.mark.parametrize("mode", MODES)
def test_beta_one_with_orthonormal_keys_stores_values(mode):
    """Head h queries basis key u_h at every step and reads the value last written under u_h (0 before)."""
    order = [0, 1, 2, 0, 3, 1, 4, 0, 2]  # writing a key again overwrites its value
    T, H, F = len(order), 5, 8
    basis, _ = torch.linalg.qr(torch.randn(F, F, generator=gen(22)))  # columns orthonormal
    k = basis.T[order][None, :, None, :].expand(1, T, H, F)  # [1, T, H, F]
    q = basis.T[:H][None, None].expand(1, T, H, F)  # [1, T, H, F]  head h reads u_h
    v = torch.randn(1, T, H, 3, generator=gen(23))
    o, state = delta_rule(q, k, v, torch.ones(1, T, H), mode=mode, chunk_size=4, output_final_state=True)
    expected = torch.zeros_like(o)
    for t in range(T):
        for h in range(H):
            writes = [s for s in range(t + 1) if order[s] == h]
            if writes:
                expected[0, t, h] = v[0, writes[-1], h]
    assert_close(o, expected, OUT_TOL, "beta = 1 recall")
    unused = basis[:, 5:]  # never written: the memory returns 0
    assert torch.einsum("fu,bhfd->bhud", unused, state.S).abs().max() < 1e-5


@pytest.mark.parametrize("mode", MODES)
def test_zero_decay_keeps_only_the_current_token(mode):
    leaves = delta_leaves(2, 20, 2, 6, 5, seed=24, gated=True, with_state=True)
    with torch.no_grad():
        leaves["log_decay"].fill_(float("-inf"))
    o, state = delta_call(mode, 8)(leaves)
    x = _plain(leaves)
    beta = x["beta"].unsqueeze(-1)  # [B, T, H, 1]
    assert_close(o, beta * (x["q"] * x["k"]).sum(-1, keepdim=True) * x["v"], OUT_TOL, "decay 0 output")
    S_last = torch.einsum("bhf,bhd->bhfd", beta[:, -1] * x["k"][:, -1], x["v"][:, -1])
    assert_close(state.S, S_last, OUT_TOL, "decay 0 state")
    grads = torch.autograd.grad(o.sum() + state.S.sum(), list(leaves.values()))
    assert all(torch.isfinite(g).all() for g in grads), "non-finite gradient with decay 0"


@pytest.mark.parametrize("mode", MODES)
def test_decay_one_is_the_ungated_rule(mode):
    x = _plain(delta_leaves(2, 29, 2, 6, 5, seed=25, gated=True, with_state=True))
    o_gated, s_gated = delta_call(mode, 8)({**x, "log_decay": torch.zeros_like(x["log_decay"])})
    o_plain, s_plain = delta_call(mode, 8)({k: t for k, t in x.items() if k != "log_decay"})
    assert_close(o_gated, o_plain, 1e-6, "decay 1 output")
    assert_close(s_gated.S, s_plain.S, 1e-6, "decay 1 state")


def delta_pieces(x, key_mask, decode_mode, sizes=(37, 1, 1, 1, 1, 1, 20)):
    """Prefill, decode token by token, prefill again, carrying the state."""
    outs, state, start = [], None, 0
    for n in sizes:
        sl = slice(start, start + n)
        o, state = delta_rule(x["q"][:, sl], x["k"][:, sl], x["v"][:, sl], x["beta"][:, sl],
                              log_decay=x["log_decay"][:, sl], key_mask=None if key_mask is None else key_mask[:, sl],
                              mode=decode_mode if n == 1 else "chunk", chunk_size=16, initial_state=state,
                              output_final_state=True)
        outs.append(o)
        start += n
    return torch.cat(outs, 1), state


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("decode_mode", ["chunk", "recurrent"])
def test_delta_is_an_rnn(decode_mode, padded):
    pads, T = [0, 1, 2, 3, 4, 5], 62
    x = _plain(delta_leaves(len(pads), T, 2, 6, 4, seed=26, gated=True, with_state=False))
    key_mask = left_pad_mask(T, pads) if padded else None
    if padded:  # padding content must not leak anywhere, not even as NaN
        for name in ("k", "v", "beta", "log_decay"):
            x[name] = x[name].masked_fill(~key_mask.view(*key_mask.shape, *(1,) * (x[name].dim() - 2)), float("nan"))
    o_full, s_full = delta_call("chunk", 16, key_mask)(x)
    o_pieces, s_pieces = delta_pieces(x, key_mask, decode_mode)
    assert torch.isfinite(o_full).all() and torch.isfinite(o_pieces).all()
    assert_close(o_pieces, o_full, OUT_TOL, "pieces output")
    assert_close(s_pieces.S, s_full.S, OUT_TOL, "pieces S")
    if padded:
        for b, p in enumerate(pads):
            row = {k: t[b:b + 1, p:] for k, t in x.items()}
            o_alone, s_alone = delta_call("chunk", 16)(row)
            assert_close(o_full[b:b + 1, p:], o_alone, OUT_TOL, f"row {b} output vs unpadded")
            assert_close(s_full.S[b:b + 1], s_alone.S, OUT_TOL, f"row {b} S vs unpadded")


@pytest.mark.parametrize("gated", [False, True])
def test_weights_times_v_is_the_output(gated):
    leaves = delta_leaves(2, 63, 2, 8, 5, seed=27, gated=gated, with_state=False)
    if gated:
        with torch.no_grad():
            leaves["log_decay"][:, 10:13] = float("-inf")
    A = delta_rule_weights(leaves["q"], leaves["k"], leaves["beta"], leaves.get("log_decay"))
    o, _ = delta_call("chunk", 16)(leaves)
    assert A.shape == (2, 2, 63, 63) and A.dtype == torch.float32
    assert torch.equal(A, A.tril()), "weights must be causal"
    assert_close(torch.einsum("bhts,bshd->bthd", A, leaves["v"]), o, OUT_TOL, "A v vs chunk output")
    grads = torch.autograd.grad(A.square().sum(), [t for n, t in leaves.items() if n != "v"])
    assert all(torch.isfinite(g).all() for g in grads)


def test_dtypes_and_state_layout():
    x = _plain(delta_leaves(1, 5, 2, 4, 3, seed=28, gated=True, with_state=False))
    o, state = delta_rule(x["q"].bfloat16(), x["k"].bfloat16(), x["v"].bfloat16(), x["beta"].bfloat16(),
                          log_decay=x["log_decay"].bfloat16(), output_final_state=True)
    assert o.dtype == torch.bfloat16 and state.S.dtype == torch.float32 and state.S.shape == (1, 2, 4, 3)
    (S,) = state  # unpacks as (S,)
    assert S is state.S
    o, state = delta_rule(*(x[n].double() for n in ("q", "k", "v", "beta")), output_final_state=True)
    assert o.dtype == torch.float64 and state.S.dtype == torch.float64


# ---------------------------------------------------------------- sliding window + delta memory


def window_leaves(B, T, H, window, seed, gated, with_state, Dk=6, D=5, F=6):
    g = gen(seed)
    leaves = {
        "q": torch.randn(B, T, H, Dk, generator=g), "k": torch.randn(B, T, H, Dk, generator=g),
        "v": torch.randn(B, T, H, D, generator=g),
        "phi_q": unit(torch.randn(B, T, H, F, generator=g)), "phi_k": unit(torch.randn(B, T, H, F, generator=g)),
        "beta": torch.rand(B, T, H, generator=g), "window_factor": torch.rand(H, generator=g) * 0.8 + 0.1,
    }
    if gated:
        leaves["log_decay"] = nnf.logsigmoid(torch.randn(B, T, H, generator=g) + 2)
    if with_state:
        leaves.update(
            S=torch.randn(B, H, F, D, generator=g), k_buf=torch.randn(B, H, window, Dk, generator=g),
            v_buf=torch.randn(B, H, window, D, generator=g), phi_k_buf=unit(torch.randn(B, H, window, F, generator=g)),
            beta_buf=torch.rand(B, H, window, generator=g),
        )
    return {k: x.requires_grad_() for k, x in leaves.items()}


def start_valid(B, window):
    valid = torch.ones(B, window, dtype=torch.bool)
    valid[0, : (window + 1) // 2] = False  # row 0 starts mid-stream with a partly empty buffer
    return valid


def window_call(mode, chunk_size, window, key_mask=None):
    def call(x):
        state = None
        if "S" in x:
            state = DeltaWindowState(x["S"], x["k_buf"], x["v_buf"], x["phi_k_buf"], x["beta_buf"],
                                     start_valid(x["q"].shape[0], window))
        return sliding_window_delta_rule(
            x["q"], x["k"], x["v"], x["phi_q"], x["phi_k"], x["beta"], window=window,
            window_factor=x["window_factor"], scale=x["q"].shape[-1] ** -0.5, log_decay=x.get("log_decay"),
            key_mask=key_mask, mode=mode, chunk_size=chunk_size, initial_state=state, output_final_state=True)
    return call


WINDOW_CASES = [(1, 16, 4), (63, 16, 1), (63, 16, 4), (63, 16, 16), (500, 64, 16), (30, 8, 40)]


@pytest.mark.parametrize("mode", ["chunk", "quadratic"])
@pytest.mark.parametrize("with_state,masked,gated", [(False, False, False), (True, False, True), (False, True, True),
                                                     (True, True, False)])
@pytest.mark.parametrize("T,chunk_size,window", WINDOW_CASES)
def test_window_matches_recurrent(T, chunk_size, window, with_state, masked, gated, mode):
    key_mask = left_pad_mask(T, [0, min(5, T)]) if masked else None
    leaves = window_leaves(2, T, 2, window, seed=T + window, gated=gated, with_state=with_state)
    fast = run_with_grads(window_call(mode, chunk_size, window, key_mask), leaves)
    ref = run_with_grads(window_call("recurrent", chunk_size, window, key_mask), leaves)
    compare_runs(fast, ref, list(leaves))


def delayed(x: torch.Tensor, window: int) -> torch.Tensor:
    """x [B, T, ...] shifted `window` steps later along time, zeros first."""
    return torch.cat([torch.zeros_like(x[:, :window]), x[:, : max(x.shape[1] - window, 0)]], 1)[:, : x.shape[1]]


@pytest.mark.parametrize("window", [1, 4, 16, 40])
def test_window_matches_the_definition(window):
    """Softmax over the band from torch.softmax, memory = delta_rule (token loop) on the delayed key stream."""
    T = 30
    x = _plain(window_leaves(2, T, 2, window, seed=30 + window, gated=True, with_state=False))
    scores = torch.einsum("bthd,bshd->bhts", x["q"], x["k"]) * x["q"].shape[-1] ** -0.5
    diff = torch.arange(T)[:, None] - torch.arange(T)[None, :]
    soft = scores.masked_fill(~((diff >= 0) & (diff < window)), float("-inf")).softmax(-1)
    soft = torch.einsum("bhts,bshd->bthd", soft, x["v"])
    memory, _ = delta_rule(x["phi_q"], delayed(x["phi_k"], window), delayed(x["v"], window),
                           delayed(x["beta"], window), log_decay=x["log_decay"], mode="recurrent")
    f = torch.where(torch.arange(T)[:, None, None] >= window, x["window_factor"][:, None], 1.0)  # [T, H, 1]
    expected = f * soft + (1 - f) * memory  # the softmax alone until a token has entered the memory
    for mode in MODES:
        o, _ = window_call(mode, 8, window)(x)
        assert_close(o, expected, OUT_TOL, f"{mode} vs definition")


@pytest.mark.parametrize("mode", MODES)
def test_window_alone_until_the_memory_holds_a_token(mode):
    """Before any real token has left the window the output is the softmax window's alone (f_t = 1), whatever f_h
    and the left padding; from then on f_h mixes in the memory."""
    T, window, pads = 20, 6, [0, 3]
    x = _plain(window_leaves(2, T, 2, window, seed=7, gated=True, with_state=False))
    key_mask = left_pad_mask(T, pads)
    names = ("q", "k", "v", "phi_q", "phi_k", "beta")
    call = {"window": window, "scale": 0.5, "log_decay": x["log_decay"], "key_mask": key_mask, "mode": mode,
            "chunk_size": 4}
    o, _ = sliding_window_delta_rule(*(x[n] for n in names), window_factor=x["window_factor"], **call)
    alone, _ = sliding_window_delta_rule(*(x[n] for n in names), window_factor=torch.ones(2), **call)
    for b, p in enumerate(pads):
        first = slice(p, p + window)  # the row's first `window` real tokens
        assert_close(o[b, first], alone[b, first], OUT_TOL, f"row {b}: softmax alone")
        assert not torch.allclose(o[b, p + window:], alone[b, p + window:]), f"row {b}: the memory mixes in after"


def window_pieces(x, key_mask, decode_mode, window, sizes=(37, 1, 1, 1, 1, 1, 20)):
    outs, state, start = [], None, 0
    for n in sizes:
        sl = slice(start, start + n)
        p = {k: (t[:, sl] if t.dim() >= 3 else t) for k, t in x.items()}
        o, state = sliding_window_delta_rule(
            p["q"], p["k"], p["v"], p["phi_q"], p["phi_k"], p["beta"], window=window,
            window_factor=x["window_factor"], scale=0.5, log_decay=p["log_decay"],
            key_mask=None if key_mask is None else key_mask[:, sl], mode=decode_mode if n == 1 else "chunk",
            chunk_size=16, initial_state=state, output_final_state=True)
        outs.append(o)
        start += n
    return torch.cat(outs, 1), state


def assert_states_close(a: DeltaWindowState, b: DeltaWindowState, what: str):
    for name, x, y in zip(DeltaWindowState._fields, a, b):
        if x.dtype == torch.bool:
            assert torch.equal(x, y), f"{what}: state.{name} differs"
        else:
            assert_close(x, y, OUT_TOL, f"{what}: state.{name}")


@pytest.mark.parametrize("window", [1, 4, 16, 80])
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("decode_mode", ["chunk", "recurrent"])
def test_window_is_an_rnn(decode_mode, padded, window):
    pads, T = [0, 1, 2, 3, 4, 5], 62
    x = _plain(window_leaves(len(pads), T, 2, window, seed=40 + window, gated=True, with_state=False))
    key_mask = left_pad_mask(T, pads) if padded else None
    if padded:  # padding content must not leak anywhere, not even as NaN
        for name in ("k", "v", "phi_k", "beta", "log_decay"):
            x[name] = x[name].masked_fill(~key_mask.view(*key_mask.shape, *(1,) * (x[name].dim() - 2)), float("nan"))
    call = {"window": window, "window_factor": x["window_factor"], "scale": 0.5, "key_mask": key_mask,
            "chunk_size": 16, "output_final_state": True}
    names = ("q", "k", "v", "phi_q", "phi_k", "beta")
    o_full, s_full = sliding_window_delta_rule(*(x[n] for n in names), log_decay=x["log_decay"], **call)
    o_pieces, s_pieces = window_pieces(x, key_mask, decode_mode, window)
    assert torch.isfinite(o_full).all() and torch.isfinite(o_pieces).all()
    assert_close(o_pieces, o_full, OUT_TOL, "pieces output")
    assert_states_close(s_pieces, s_full, "pieces")
    if padded:
        call.update(key_mask=None)
        for b, p in enumerate(pads):
            row = [x[n][b:b + 1, p:] for n in names]
            o_alone, s_alone = sliding_window_delta_rule(*row, log_decay=x["log_decay"][b:b + 1, p:], **call)
            assert_close(o_full[b:b + 1, p:], o_alone, OUT_TOL, f"row {b} output vs unpadded")
            assert_states_close(DeltaWindowState(*(t[b:b + 1] for t in s_full)), s_alone, f"row {b}")


def test_window_state_layout_and_dtypes():
    x = _plain(window_leaves(2, 3, 2, 6, seed=50, gated=False, with_state=False))
    o, state = window_call("chunk", 4, 6)(x)
    assert o.shape == (2, 3, 2, 5) and state._fields == ("S", "k", "v", "phi_k", "beta", "valid")
    assert state.k.shape == (2, 2, 6, 6) and state.beta.shape == (2, 2, 6) and state.phi_k.dtype == torch.float32
    assert state.valid.tolist() == [[False, False, False, True, True, True]] * 2  # left-padded buffer
    assert torch.equal(state.beta[:, :, :3], torch.zeros(2, 2, 3))


# ---------------------------------------------------------------- validation


def _delta(**over):
    x = {"q": torch.rand(1, 4, 2, 3), "k": torch.rand(1, 4, 2, 3), "v": torch.rand(1, 4, 2, 5),
         "beta": torch.rand(1, 4, 2)}
    kw = {k: over.pop(k) for k in list(over) if k not in x}
    x.update(over)
    return lambda: delta_rule(x["q"], x["k"], x["v"], x["beta"], **kw)


def _win(**over):
    x = {"q": torch.rand(1, 4, 2, 6), "k": torch.rand(1, 4, 2, 6), "v": torch.rand(1, 4, 2, 5),
         "phi_q": torch.rand(1, 4, 2, 3), "phi_k": torch.rand(1, 4, 2, 3), "beta": torch.rand(1, 4, 2)}
    kw = {"window": 2, "window_factor": torch.full((2,), 0.5), "scale": 0.4}
    kw.update({k: over.pop(k) for k in list(over) if k not in x})
    x.update(over)
    return lambda: sliding_window_delta_rule(*x.values(), **kw)


def _window_state(**over):
    s = {"S": torch.zeros(1, 2, 3, 5), "k": torch.zeros(1, 2, 2, 6), "v": torch.zeros(1, 2, 2, 5),
         "phi_k": torch.zeros(1, 2, 2, 3), "beta": torch.zeros(1, 2, 2), "valid": torch.ones(1, 2, dtype=torch.bool)}
    s.update(over)
    return DeltaWindowState(**s)


@pytest.mark.parametrize("call,message", [
    (_delta(q=torch.rand(4, 2, 3)), "q must be a 4-d tensor"),
    (_delta(v=torch.rand(1, 5, 2, 5)), r"q and v must agree on \[B, T, H\]"),
    (_delta(k=torch.rand(1, 4, 2, 4)), "q and k must have the same feature size"),
    (_delta(beta=torch.rand(1, 4, 2, 1)), r"beta must be a tensor of shape \(1, 4, 2\)"),
    (_delta(beta=None), r"beta must be a tensor of shape \(1, 4, 2\)"),
    (_delta(log_decay=torch.rand(1, 4)), r"log_decay must be a tensor of shape \(1, 4, 2\)"),
    (_delta(key_mask=torch.ones(1, 4)), "key_mask must be a bool tensor"),
    (_delta(mode="fast"), "known modes: chunk, recurrent, quadratic"),
    (_delta(chunk_size=0), "chunk_size must be a positive int"),
    (_delta(initial_state=DeltaState(torch.zeros(1, 2, 3, 4))), r"initial_state.S must have shape \(1, 2, 3, 5\)"),
    (_delta(initial_state=torch.zeros(1, 2, 3, 5)), "initial_state must be a DeltaState"),
    (lambda: delta_rule_weights(torch.rand(1, 4, 2, 3), torch.rand(1, 4, 2, 3), torch.rand(1, 2, 4)),
     r"beta must be a tensor of shape \(1, 4, 2\)"),
    (_win(window=0), "window must be an int >= 1"),
    (_win(window=2.0), "window must be an int >= 1"),
    (_win(window_factor=torch.full((3,), 0.5)), r"window_factor must be a tensor of shape \(2,\)"),
    (_win(beta=torch.rand(1, 4, 3)), r"beta must be a tensor of shape \(1, 4, 2\)"),
    (_win(phi_k=torch.rand(1, 4, 2, 4)), "phi_q and phi_k must have the same feature size"),
    (_win(initial_state=_window_state(k=torch.zeros(1, 2, 3, 6))), r"initial_state.k must have shape \(1, 2, 2, 6\)"),
    (_win(initial_state=_window_state(beta=torch.zeros(1, 2, 3))), r"initial_state.beta must have shape \(1, 2, 2\)"),
    (_win(initial_state=_window_state(valid=torch.ones(1, 2))), "initial_state.valid must be a bool tensor"),
    (_win(initial_state=DeltaState(torch.zeros(1, 2, 3, 5))), "initial_state must be a DeltaWindowState"),
])
def test_validation_errors(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_valid_calls_pass_validation():
    _delta(initial_state=DeltaState(torch.zeros(1, 2, 3, 5)), log_decay=-torch.rand(1, 4, 2))()
    _win(initial_state=_window_state(), key_mask=torch.ones(1, 4, dtype=torch.bool))()
