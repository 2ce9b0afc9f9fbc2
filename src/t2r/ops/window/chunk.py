"""Sliding softmax window + linear attention with one shared normaliser (LoLCATs-style hybrid).

Query t attends with weights f_h exp(s_tj - m_t) to the valid keys t - window < j <= t and with weights
(1 - f_h) phi(q_t) . phi(k_j) to the valid keys j <= t - window; o_t = sum w v / guard(sum w).

Chunk form: prefix the new tokens with the `window` buffered ones (an all-invalid buffer at the start
of a stream). The linear part is then causal linear attention whose key/value stream is the first T
entries of that concatenation (keys delayed by `window`), started from (S, z); when gated, it is gated linear
attention on that delayed stream with the undelayed decays (key j enters the state at step j + window, and the state
decays by exp(g_t) at every step t). The softmax part is a
band: query block n reads a slab of chunk_size + window - 1 keys, cut with `unfold`. Nothing T x T.
"""

from __future__ import annotations

import torch

from ..common import WindowState, window_weights
from ..gla import gated_linear_attention_terms
from ..linear import linear_attention_terms
from ..linear.chunk import pad_time


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


def sliding_window_chunk_terms(q, k, v, phi_q, phi_k, window, f, scale, valid, state, chunk_size, g=None):
    """Chunked form; inputs as in naive.sliding_window_quadratic_terms, state a full WindowState."""
    T = q.shape[1]
    kc = torch.cat([state.k.transpose(1, 2), k], 1)  # [B, W+T, H, Dk]
    vc = torch.cat([state.v.transpose(1, 2), v], 1)  # [B, W+T, H, D]
    pkc = torch.cat([state.phi_k.transpose(1, 2), phi_k], 1)  # [B, W+T, H, F]
    validc = torch.cat([state.valid, valid], 1)  # [B, W+T]
    lin_kw = {"mode": "chunk", "chunk_size": chunk_size, "initial_state": (state.S, state.z), "output_final_state": True}
    if g is None:  # keys and values delayed by `window`: num_l [B, T, H, D], den_l [B, T, H]
        num_l, den_l, lin = linear_attention_terms(phi_q, pkc[:, :T], vc[:, :T], **lin_kw)
    else:  # the decays are not delayed: the state decays at every step
        num_l, den_l, lin = gated_linear_attention_terms(phi_q, pkc[:, :T], vc[:, :T], g, **lin_kw)
    num_w, den_w = _band_softmax_terms(q, kc, vc, validc, window, scale, chunk_size)
    num = f[:, None] * num_w + (1 - f)[:, None] * num_l  # [B, T, H, D]
    den = f * den_w + (1 - f) * den_l  # [B, T, H]
    buffers = [x[:, -window:].transpose(1, 2) for x in (kc, vc, pkc)]  # [B, H, W, *]
    return num, den, WindowState(lin.S, lin.z, *buffers, validc[:, -window:])
