"""Chunked parallel form of causal linear attention (training and prefill).

The sequence is cut into chunks of C tokens. Inside a chunk the masked quadratic form is used; across
chunks, each chunk reads the state at its start, which is S0 plus an exclusive cumulative sum of the
per-chunk phi_k^T v sums: no Python loop over chunks, cost O(T C F + T F D).
"""

from __future__ import annotations

import torch

from ..common import LinearState


def pad_time(x: torch.Tensor, n: int) -> torch.Tensor:
    """Append n zero (or False) steps along dim 1."""
    if n == 0:
        return x
    return torch.cat([x, x.new_zeros(x.shape[0], n, *x.shape[2:])], 1)


def _exclusive_cumsum(x: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
    """start + sum of the entries before each index along dim 2 (the chunk axis)."""
    before = torch.cat([torch.zeros_like(x[:, :, :1]), x[:, :, :-1].cumsum(2)], 2)  # like x
    return start.unsqueeze(2) + before


def linear_attention_chunk_terms(phi_q, phi_k, v, S0, z0, chunk_size: int):
    """Causal linear attention, chunked. phi_*: [B, T, H, F], v: [B, T, H, D], float32.

    Returns num [B, T, H, D], den [B, T, H] and the final LinearState.
    """
    B, T, H, F = phi_q.shape
    D = v.shape[-1]
    C = min(chunk_size, T)
    N = -(-T // C)

    def blocks(x):  # [B, T, H, X] -> [B, H, N, C, X], zero-padded tail
        return pad_time(x, N * C - T).reshape(B, N, C, H, -1).permute(0, 3, 1, 2, 4)

    q, k, vb = blocks(phi_q), blocks(phi_k), blocks(v)  # [B, H, N, C, *]
    kv = torch.einsum("bhncf,bhncd->bhnfd", k, vb)  # [B, H, N, F, D]
    kz = k.sum(3)  # [B, H, N, F]
    S_start = _exclusive_cumsum(kv, S0)  # [B, H, N, F, D]
    z_start = _exclusive_cumsum(kz, z0)  # [B, H, N, F]
    A = torch.einsum("bhncf,bhnsf->bhncs", q, k).tril()  # [B, H, N, C, C]
    num = torch.einsum("bhncs,bhnsd->bhncd", A, vb)  # [B, H, N, C, D]
    num = num + torch.einsum("bhncf,bhnfd->bhncd", q, S_start)  # [B, H, N, C, D]
    den = A.sum(-1) + torch.einsum("bhncf,bhnf->bhnc", q, z_start)  # [B, H, N, C]
    num = num.permute(0, 2, 3, 1, 4).reshape(B, N * C, H, D)[:, :T]  # [B, T, H, D]
    den = den.permute(0, 2, 3, 1).reshape(B, N * C, H)[:, :T]  # [B, T, H]
    state = LinearState(S_start[:, :, -1] + kv[:, :, -1], z_start[:, :, -1] + kz[:, :, -1])
    return num, den, state
