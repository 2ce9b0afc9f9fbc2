"""Sliding softmax window + linear attention with one shared normaliser (LoLCATs-style hybrid).

Query t attends with weights f_h exp(s_tj - m_t) to the valid keys t - window < j <= t and with weights
(1 - f_h) phi(q_t) . phi(k_j) to the valid keys j <= t - window; o_t = sum w v / guard(sum w).

Chunk form: prefix the new tokens with the `window` buffered ones (an all-invalid buffer at the start
of a stream). The linear part is then causal linear attention whose key/value stream is the first T
entries of that concatenation (keys delayed by `window`), started from (S, z); the softmax part is a
band: query block n reads a slab of chunk_size + window - 1 keys, cut with `unfold`. Nothing T x T.
"""

from __future__ import annotations

import torch

from .chunk import pad_time
from .common import (WindowState, acc, check_mode, check_rank4, check_same_last, check_state, guard,
                     window_weights)
from .linear import linear_attention_terms
from .recurrent import sliding_window_recurrent_terms
from .reference import sliding_window_quadratic_terms


def _band_softmax_terms(q, kc, vc, validc, window: int, scale: float, chunk_size: int):
    """Unnormalised softmax-window terms; query s reads the concatenated keys s+1 .. s+window.

    q: [B, T, H, Dk]; kc: [B, window+T, H, Dk]; vc: [B, window+T, H, D]; validc: [B, window+T].
    Returns num [B, T, H, D], den [B, T, H] (without the factor f).
    """
    B, T, H, _ = q.shape
    D = vc.shape[-1]
    C = min(chunk_size, T)
    N = -(-T // C)
    R = C + window - 1  # keys a query block can see
    pad = N * C - T
    qb = pad_time(q, pad).reshape(B, N, C, H, -1)  # [B, N, C, H, Dk]
    kb = pad_time(kc[:, 1:], pad).unfold(1, R, C)  # [B, N, H, Dk, R]
    vb = pad_time(vc[:, 1:], pad).unfold(1, R, C)  # [B, N, H, D, R]
    ok = pad_time(validc[:, 1:], pad).unfold(1, R, C)  # [B, N, R]
    rel = torch.arange(R, device=q.device)[None, :] - torch.arange(C, device=q.device)[:, None]  # [C, R]
    band = (rel >= 0) & (rel < window)  # [C, R]
    mask = band & ok[:, :, None, None, :]  # [B, N, 1, C, R]
    scores = scale * torch.einsum("bnchd,bnhdr->bnhcr", qb, kb)  # [B, N, H, C, R]
    e = window_weights(scores, mask)  # [B, N, H, C, R]
    num = torch.einsum("bnhcr,bnhdr->bnchd", e, vb).reshape(B, N * C, H, D)[:, :T]  # [B, T, H, D]
    den = e.sum(-1).transpose(2, 3).reshape(B, N * C, H)[:, :T]  # [B, T, H]
    return num, den


def _sliding_window_chunk_terms(q, k, v, phi_q, phi_k, window, f, scale, valid, state, chunk_size):
    """Chunked form; inputs as in reference.sliding_window_quadratic_terms, state a full WindowState."""
    T = q.shape[1]
    kc = torch.cat([state.k.transpose(1, 2), k], 1)  # [B, W+T, H, Dk]
    vc = torch.cat([state.v.transpose(1, 2), v], 1)  # [B, W+T, H, D]
    pkc = torch.cat([state.phi_k.transpose(1, 2), phi_k], 1)  # [B, W+T, H, F]
    validc = torch.cat([state.valid, valid], 1)  # [B, W+T]
    num_l, den_l, lin = linear_attention_terms(
        phi_q, pkc[:, :T], vc[:, :T], mode="chunk", chunk_size=chunk_size,
        initial_state=(state.S, state.z), output_final_state=True,
    )  # [B, T, H, D], [B, T, H]
    num_w, den_w = _band_softmax_terms(q, kc, vc, validc, window, scale, chunk_size)
    num = f[:, None] * num_w + (1 - f)[:, None] * num_l  # [B, T, H, D]
    den = f * den_w + (1 - f) * den_l  # [B, T, H]
    buffers = [x[:, -window:].transpose(1, 2) for x in (kc, vc, pkc)]  # [B, H, W, *]
    return num, den, WindowState(lin.S, lin.z, *buffers, validc[:, -window:])


def _check_inputs(q, k, v, phi_q, phi_k, window, window_factor, key_mask, initial_state, mode, chunk_size):
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
    if key_mask is not None and (key_mask.dtype != torch.bool or tuple(key_mask.shape) != (B, T)):
        raise ValueError(
            f"key_mask must be a bool tensor of shape ({B}, {T}) (True = real token), "
            f"got {key_mask.dtype} {tuple(key_mask.shape)}"
        )
    if initial_state is not None:
        F, D = phi_k.shape[-1], v.shape[-1]
        expected = {"S": (B, H, F, D), "z": (B, H, F), "k": (B, H, window, Dk), "v": (B, H, window, D),
                    "phi_k": (B, H, window, F), "valid": (B, window)}
        check_state("WindowState", initial_state, WindowState._fields, expected)
        if initial_state[5].dtype != torch.bool:
            raise ValueError(f"initial_state.valid must be a bool tensor, got {initial_state[5].dtype}")


def _zero_invalid(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """float32 copy of x with the steps where `valid` (broadcastable to x) is False set to 0, NaN too."""
    return torch.where(valid, acc(x), 0.0)


def _start_state(initial_state, B, H, window, Dk, D, F, device):
    """float32 WindowState with invalid buffer slots zeroed; an all-invalid one when None."""
    if initial_state is None:
        f32 = dict(dtype=torch.float32, device=device)
        return WindowState(
            torch.zeros(B, H, F, D, **f32), torch.zeros(B, H, F, **f32),
            torch.zeros(B, H, window, Dk, **f32), torch.zeros(B, H, window, D, **f32),
            torch.zeros(B, H, window, F, **f32), torch.zeros(B, window, dtype=torch.bool, device=device),
        )
    S, z, k, v, phi_k, valid = initial_state
    buffers = [_zero_invalid(x, valid[:, None, :, None]) for x in (k, v, phi_k)]  # [B, H, W, *]
    return WindowState(acc(S), acc(z), *buffers, valid)


def sliding_window_linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    phi_q: torch.Tensor,
    phi_k: torch.Tensor,
    *,
    window: int,
    window_factor: torch.Tensor,
    scale: float,
    key_mask: torch.Tensor | None = None,
    mode: str = "chunk",
    chunk_size: int = 64,
    initial_state=None,
    output_final_state: bool = False,
    eps: float = 1e-6,
):
    """Sliding softmax window over the last `window` keys + linear attention over the older ones.

    q, k: [B, T, H, Dk] (after positions); v: [B, T, H, D]; phi_q, phi_k: [B, T, H, F];
    window_factor: [H] in (0, 1); key_mask: [B, T] bool (True = real token) or None;
    initial_state: WindowState or None; mode: "chunk" | "recurrent" | "quadratic".
    Returns (o [B, T, H, D] in v.dtype, WindowState if output_final_state else None); buffers k, v
    keep the dtypes of k, v; S, z, phi_k are float32.
    """
    _check_inputs(q, k, v, phi_q, phi_k, window, window_factor, key_mask, initial_state, mode, chunk_size)
    B, T, H, Dk = k.shape
    valid = key_mask if key_mask is not None else torch.ones(B, T, dtype=torch.bool, device=k.device)
    step_ok = valid[:, :, None, None]  # [B, T, 1, 1]
    k32, v32, pk32 = (_zero_invalid(x, step_ok) for x in (k, v, phi_k))  # [B, T, H, *]
    args = (acc(q), k32, v32, acc(phi_q), pk32, window, acc(window_factor), scale, valid)
    if mode == "quadratic" and initial_state is None:
        num, den, state = sliding_window_quadratic_terms(*args, None)
    else:
        start = _start_state(initial_state, B, H, window, Dk, v.shape[-1], phi_k.shape[-1], k.device)
        if mode == "chunk":
            num, den, state = _sliding_window_chunk_terms(*args, start, chunk_size)
        elif mode == "recurrent":
            num, den, state = sliding_window_recurrent_terms(*args, start)
        else:
            num, den, state = sliding_window_quadratic_terms(*args, start)
    o = (num / guard(den, eps).unsqueeze(-1)).to(v.dtype)  # [B, T, H, D]
    if not output_final_state:
        return o, None
    return o, state._replace(k=state.k.to(k.dtype), v=state.v.to(v.dtype))
