"""Chunked form of the (gated) delta rule (training and prefill): the UT transform per chunk of C tokens.

Inside every chunk (all chunks at once) one unit lower-triangular solve gives U = T diag(beta) V and
W = T diag(beta gamma) K (naive.block_terms); a Python loop over the N chunks, not the tokens, then carries the
state: u = U - W S_start, o = diag(gamma) Q S_start + (Q K^T o Gamma) u, S_end = gamma_C S_start + K^T (decayed) u.
Cost O(T C (C + F + D) + T F D). Inputs are float32 with the head axis first, as in naive.py.
"""

from __future__ import annotations

import torch
import torch.nn.functional as nnf

from ..common import DeltaState
from .naive import block_terms, read_and_update


def _blocks(x: torch.Tensor, C: int, N: int) -> torch.Tensor:
    """[B, H, T, *] -> [B, H, N, C, *] (or [B, H, T] -> [B, H, N, C]), the tail padded with zeros."""
    T = x.shape[2]
    pad = (0, N * C - T) if x.dim() == 3 else (0, 0, 0, N * C - T)
    return nnf.pad(x, pad).reshape(*x.shape[:2], N, C, *x.shape[3:])


def delta_rule_chunk(q, k, v, beta, g, S, chunk_size: int):
    """The delta rule, chunked. q, k: [B, H, T, F]; v: [B, H, T, D]; beta, g: [B, H, T]; S: [B, H, F, D].

    The padded tail of the last chunk has beta 0 and decay 1 (g = 0): it leaves the state unchanged.
    Returns o [B, H, T, D] and the final DeltaState.
    """
    T = q.shape[2]
    C = min(chunk_size, T)
    N = -(-T // C)
    qb, kb, vb, bb, gb = (_blocks(x, C, N) for x in (q, k, v, beta, g))  # [B, H, N, C, *]
    U, W, A, gamma, to_end = block_terms(qb, kb, vb, bb, gb)  # every chunk at once
    outs = []
    for n in range(N):
        o, S = read_and_update(S, qb[:, :, n], kb[:, :, n], U[:, :, n], W[:, :, n], A[:, :, n],
                               gamma[:, :, n], to_end[:, :, n])  # [B, H, C, D], [B, H, F, D]
        outs.append(o)
    return torch.cat(outs, 2)[:, :, :T], DeltaState(S)  # [B, H, T, D]
