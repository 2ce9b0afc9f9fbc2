"""Sliding softmax window beside a delta-rule memory (LoLCATs-style hybrid, delta memory instead of a linear sum).

o_t = f_t softmax_{t - window < j <= t}(scale q_t . k_j) v + (1 - f_t) M_t^T phi(q_t), where M is the gated delta rule
run on the key / value / beta stream delayed by `window` steps (token j enters at step j + window) with the decay of
the current step t. Each part is normalised on its own (the softmax over the valid window keys, 0 when there are
none). f_t is the head's factor f_h once the memory is live (a real token has entered it, or it started non-zero) and
1 before: while the window still holds every real token the output is the softmax alone, not f_h of it beside an empty
memory. Chunk form: prefix the new tokens with the buffered ones; the memory is delta_rule_chunk on the first T
entries of that stream, the softmax a band (window.chunk._band_softmax_terms). Recurrent form: a token loop (the slow
twin, and decoding); quadratic form: full (window + T)^2 masks and the T x T delta rule.
"""

from __future__ import annotations

import torch

from ..common import (
    DeltaWindowState,
    acc,
    check_key_mask,
    check_mode,
    check_rank4,
    check_same_last,
    check_state,
    window_weights,
)
from ..window.chunk import _band_softmax_terms
from .chunk import delta_rule_chunk
from .gates import check_gates, prepare_gates, zero_padded
from .naive import delta_rule_quadratic
from .recurrent import delta_step


def _check_inputs(q, k, v, phi_q, phi_k, beta, log_decay, window, window_factor, key_mask, initial_state, mode,
                  chunk_size) -> None:
    check_mode(mode, chunk_size)
    check_rank4(q=q, k=k, v=v, phi_q=phi_q, phi_k=phi_k)
    check_same_last("q", q, "k", k)
    check_same_last("phi_q", phi_q, "phi_k", phi_k)
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"window must be an int >= 1, got {window!r}")
    B, T, H, Dk = k.shape
    if not isinstance(window_factor, torch.Tensor) or tuple(window_factor.shape) != (H,):
        got = tuple(window_factor.shape) if isinstance(window_factor, torch.Tensor) else window_factor
        raise ValueError(f"window_factor must be a tensor of shape ({H},) (one factor per head), got {got}")
    check_gates(beta, log_decay, B, T, H)
    check_key_mask(key_mask, B, T)
    if initial_state is not None:
        F, D = phi_k.shape[-1], v.shape[-1]
        expected = {"S": (B, H, F, D), "k": (B, H, window, Dk), "v": (B, H, window, D), "phi_k": (B, H, window, F),
                    "beta": (B, H, window), "valid": (B, window)}
        check_state("DeltaWindowState", initial_state, DeltaWindowState._fields, expected)
        if initial_state[5].dtype != torch.bool:
            raise ValueError(f"initial_state.valid must be a bool tensor, got {initial_state[5].dtype}")


def _start_state(initial_state, B, H, window, Dk, D, F, device, dtype=torch.float32):
    """DeltaWindowState in the accumulation dtype (float32; float64 for float64 inputs) with invalid buffer slots
    zeroed (beta 0); an all-invalid one when None."""
    if initial_state is None:
        z = {"dtype": dtype, "device": device}
        return DeltaWindowState(
            torch.zeros(B, H, F, D, **z), torch.zeros(B, H, window, Dk, **z), torch.zeros(B, H, window, D, **z),
            torch.zeros(B, H, window, F, **z), torch.zeros(B, H, window, **z),
            torch.zeros(B, window, dtype=torch.bool, device=device),
        )
    S, k, v, phi_k, beta, valid = initial_state
    buffers = [zero_padded(x.transpose(1, 2), valid).transpose(1, 2) for x in (k, v, phi_k, beta)]  # [B, H, W, *]
    return DeltaWindowState(acc(S), *buffers, valid)


def _streams(state, k, v, phi_k, beta, valid):
    """The buffered tokens followed by the new ones: k, v, phi_k [B, W+T, H, *], beta [B, W+T, H], valid [B, W+T]."""
    cat = [torch.cat([buf.transpose(1, 2), new], 1) for buf, new in
           ((state.k, k), (state.v, v), (state.phi_k, phi_k), (state.beta, beta))]
    return (*cat, torch.cat([state.valid, valid], 1))


def _end_state(S, kc, vc, pkc, bc, validc, window):
    """DeltaWindowState with the last `window` entries of the streams as buffers."""
    buffers = [x[:, -window:].transpose(1, 2) for x in (kc, vc, pkc, bc)]  # [B, H, W, *]
    return DeltaWindowState(S, *buffers, validc[:, -window:])


def _live(state, validc, T):
    """[B, T] bool: the memory holds something at step t: its start state is non-zero, or a real token has entered
    it by then (the token entering at step t is stream entry t, i.e. token t - window)."""
    started = state.S.flatten(1).ne(0).any(1)  # [B]
    return started[:, None] | validc[:, :T].cummax(1).values  # [B, T]


def _mix(f, num, den, o_mem, live):
    """f_t (num / den) + (1 - f_t) o_mem with f_t = f where the memory is live, else 1; den is 0 only with no
    visible key, then num is 0 too. f: [H]; num, o_mem: [B, (T,) H, D]; den: [B, (T,) H]; live: [B, (T)]."""
    soft = num / torch.where(den > 0, den, 1.0).unsqueeze(-1)
    ft = torch.where(live.unsqueeze(-1), f, torch.ones_like(f)).unsqueeze(-1)  # [B, (T,) H, 1]
    return ft * soft + (1 - ft) * o_mem


def _heads(*xs):
    return [x.transpose(1, 2) for x in xs]  # [B, T, H, *] -> [B, H, T, *]


def window_delta_chunk(q, k, v, phi_q, phi_k, beta, g, window, f, scale, valid, state, chunk_size):
    """Chunked form. q, k: [B, T, H, Dk]; v: [B, T, H, D]; phi_*: [B, T, H, F]; beta, g: [B, T, H]; f: [H];
    valid: [B, T]; state: a full float32 DeltaWindowState. Returns o [B, T, H, D] and the end state."""
    T = q.shape[1]
    kc, vc, pkc, bc, validc = _streams(state, k, v, phi_k, beta, valid)
    o_mem, mem = delta_rule_chunk(*_heads(phi_q, pkc[:, :T], vc[:, :T], bc[:, :T], g), state.S, chunk_size)
    num, den = _band_softmax_terms(q, kc, vc, validc, window, scale, chunk_size)  # [B, T, H, D], [B, T, H]
    o = _mix(f, num, den, o_mem.transpose(1, 2), _live(state, validc, T))  # [B, T, H, D]
    return o, _end_state(mem.S, kc, vc, pkc, bc, validc, window)


def window_delta_quadratic(q, k, v, phi_q, phi_k, beta, g, window, f, scale, valid, state):
    """The slow twin with full masks: softmax over the (W + T) stream, the T x T delta rule on the delayed one."""
    T, W = q.shape[1], window
    kc, vc, pkc, bc, validc = _streams(state, k, v, phi_k, beta, valid)
    o_mem, mem = delta_rule_quadratic(*_heads(phi_q, pkc[:, :T], vc[:, :T], bc[:, :T], g), state.S)
    pos = torch.arange(W + T, device=q.device)  # [W+T]
    diff = pos[W:, None] - pos[None, :]  # [T, W+T]  query position - key position
    in_window = (diff >= 0) & (diff < W) & validc[:, None, None, :]  # [B, 1, T, W+T]
    e = window_weights(scale * torch.einsum("bthd,bshd->bhts", q, kc), in_window)  # [B, H, T, W+T]
    num = torch.einsum("bhts,bshd->bthd", e, vc)  # [B, T, H, D]
    o = _mix(f, num, e.sum(-1).transpose(1, 2), o_mem.transpose(1, 2), _live(state, validc, T))  # [B, T, H, D]
    return o, _end_state(mem.S, kc, vc, pkc, bc, validc, window)


def _push(buffer: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Drop the oldest entry along dim 2 of a [B, H, W, *] (dim 1 of a [B, W]) buffer and append x."""
    dim = 1 if buffer.dim() == 2 else 2
    return torch.cat([buffer.narrow(dim, 1, buffer.shape[dim] - 1), x.unsqueeze(dim)], dim)


def window_delta_recurrent(q, k, v, phi_q, phi_k, beta, g, window, f, scale, valid, state):
    """Token loop: the oldest buffered token (position t - window) enters the memory with the decay of step t,
    the memory is read with phi_q_t, token t is pushed into the buffers and the softmax reads them."""
    S, kb, vb, pb, bb, ok = state
    a = torch.exp(g)  # [B, T, H]
    live = _live(state, torch.cat([ok, valid], 1), q.shape[1])  # [B, T]
    outs = []
    for t in range(q.shape[1]):
        o_mem, S = delta_step(S, phi_q[:, t], pb[:, :, 0], vb[:, :, 0], bb[:, :, 0], a[:, t])  # [B, H, D]
        kb, vb, pb = _push(kb, k[:, t]), _push(vb, v[:, t]), _push(pb, phi_k[:, t])  # [B, H, W, *]
        bb, ok = _push(bb, beta[:, t]), _push(ok, valid[:, t])  # [B, H, W], [B, W]
        e = window_weights(scale * torch.einsum("bhd,bhwd->bhw", q[:, t], kb), ok[:, None, :])  # [B, H, W]
        num = torch.einsum("bhw,bhwd->bhd", e, vb)  # [B, H, D]
        outs.append(_mix(f, num, e.sum(-1), o_mem, live[:, t]))  # [B, H, D]
    return torch.stack(outs, 1), DeltaWindowState(S, kb, vb, pb, bb, ok)  # [B, T, H, D]


FORMS = {"chunk": window_delta_chunk, "recurrent": window_delta_recurrent, "quadratic": window_delta_quadratic}


def sliding_window_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    phi_q: torch.Tensor,
    phi_k: torch.Tensor,
    beta: torch.Tensor,
    *,
    window: int,
    window_factor: torch.Tensor,
    scale: float,
    log_decay: torch.Tensor | None = None,
    key_mask: torch.Tensor | None = None,
    mode: str = "chunk",
    chunk_size: int = 64,
    initial_state=None,
    output_final_state: bool = False,
    eps: float = 1e-6,
):
    """Softmax over the last `window` keys + a (gated) delta-rule memory of the older ones, mixed per head by f
    once the memory holds something (the softmax alone before: see the module's docstring).

    q, k: [B, T, H, Dk] (after positions); v: [B, T, H, D]; phi_q, phi_k: [B, T, H, F] (L2-normalised delta-rule
    features); beta, log_decay: [B, T, H] as in delta_rule (beta is delayed with its key, the decay is not);
    window_factor f: [H] in (0, 1); key_mask: [B, T] bool (True = real token) or None; initial_state:
    DeltaWindowState or None; mode: "chunk" | "recurrent" | "quadratic". eps is accepted for the signature shared
    with sliding_window_linear_attention and unused: the softmax denominator is >= 1 when a key is visible.
    Returns (o [B, T, H, D] in v.dtype, DeltaWindowState if output_final_state else None); buffers k, v keep the
    dtypes of k, v; S, phi_k, beta are float32.
    """
    _check_inputs(q, k, v, phi_q, phi_k, beta, log_decay, window, window_factor, key_mask, initial_state, mode,
                  chunk_size)
    B, T, H, Dk = k.shape
    valid = key_mask if key_mask is not None else torch.ones(B, T, dtype=torch.bool, device=k.device)
    k32, v32, pk32 = (zero_padded(x, valid) for x in (k, v, phi_k))  # [B, T, H, *]
    b32, g32 = prepare_gates(beta, log_decay, valid)  # [B, T, H]
    start = _start_state(initial_state, B, H, window, Dk, v.shape[-1], phi_k.shape[-1], k.device,
                         torch.promote_types(v.dtype, torch.float32))
    args = (acc(q), k32, v32, acc(phi_q), pk32, b32, g32, window, acc(window_factor), scale, valid, start)
    o, state = FORMS[mode](*args, *((chunk_size,) if mode == "chunk" else ()))
    if not output_final_state:
        return o.to(v.dtype), None
    return o.to(v.dtype), state._replace(k=state.k.to(k.dtype), v=state.v.to(v.dtype))
