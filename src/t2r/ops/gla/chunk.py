"""Chunked parallel form of gated linear attention (training and prefill), stable for any decay in [0, 1].

Query t gives key s <= t the weight phi_q_t . exp(G(s, t)) phi_k_s with G(s, t) = sum_{s<u<=t} g_u <= 0 per feature.
The usual trick (phi_q exp(G_t)) . (phi_k exp(-G_s)) overflows when the decays are small, so G(s, t) is never the
difference of two cumulative sums: every exponent is a sum of log decays over a stretch of steps, every factor <= 1.
  * Blocks (`causal_weights`): for t in block i and s in an earlier block j, G(s, t) = (s, end of j] + [whole blocks
    j+1 .. i-1] + [start of i, t]: three factors <= 1. Recursively: chunks, then 8-token sub-chunks, then the
    explicit masked [8, 8, F] exponent on the diagonal (8 needs less memory than 16 for chunks of 64 and up).
  * Across chunks the state is carried, in cumulative form (no loop): S at the start of chunk n is
    sum_{m<n} exp[whole chunks m+1 .. n-1] (sum_{s in m} exp(s, end of m] phi_k_s v_s^T) + exp[chunks 0 .. n-1] S0.
When no chunk's decays sum below SAFE_LOG_DECAY (trained gates: a decay per step >= 0.63 at chunks of 64) the
within-chunk weights are one product, (phi_q exp(G_t)) . (phi_k exp(-G_s)) with G the cumulative log decay inside
the chunk, both factors far inside float32; otherwise the blockwise form above. z rides along as a last column of
ones in v. Memory: O(T 8 F) for the diagonal sub-chunks, O(T C) for the weights,
O(N^2 F + N F D) for the chunk states (N chunks); nothing [T, T].
"""

from __future__ import annotations

import torch

from ..common import LinearState
from ..linear.chunk import pad_time
from .naive import segsum, with_ones

SUB_CHUNK = 8
SAFE_LOG_DECAY = -30.0  # a chunk whose decays sum to more than this takes the fast path (exp(30) ~ 1e13: far inside
                        # float32 for phi_q exp(G_t) and phi_k exp(-G_s))


def block_sizes(chunk_size: int, T: int) -> tuple[int, int]:
    """(C, c): the chunk length (chunk_size, at most T, rounded up to a multiple of c) and the sub-chunk length c."""
    C = min(chunk_size, T)
    c = min(SUB_CHUNK, C)
    return -(-C // c) * c, c


def block_log_decays(g: torch.Tensor):
    """g: [..., n, b, F] -> log decays over [block start, t], over (t, block end] (both [..., n, b, F]) and over
    the whole block ([..., n, F]); cumulative sums only, never a difference."""
    into = g.cumsum(-2)  # [..., n, b, F]
    rest = g.flip(-2).cumsum(-2).flip(-2)  # [..., n, b, F]  [t, block end]
    after = torch.cat([rest[..., 1:, :], torch.zeros_like(rest[..., :1, :])], -2)  # [..., n, b, F]
    return into, after, into[..., -1, :]


def between_blocks(total: torch.Tensor) -> torch.Tensor:
    """total: [..., n, F] -> [..., n + 1, n, F]: the log decay of the whole blocks strictly between block j and
    block i (sum of total_w over j < w < i), -inf where j >= i. Row n stands for the end of the last block."""
    seg = segsum(total)  # [..., n, n, F]  row i: sum over j < w <= i
    return torch.cat([torch.full_like(seg[..., :1, :, :], float("-inf")), seg], -3)


def causal_weights(q: torch.Tensor, k: torch.Tensor, g: torch.Tensor, blocks: tuple = ()) -> torch.Tensor:
    """[..., L, L]: phi_q_t . exp(G(s, t)) phi_k_s for s <= t, 0 above the diagonal.

    q, k, g: [..., L, F]; blocks: block lengths, largest first, each dividing L and the one before it (those >= L
    are skipped). The diagonal blocks of the last level use the explicit masked [b, b, F] exponent.
    """
    L = q.shape[-2]
    blocks = tuple(b for b in blocks if b < L)
    if not blocks:
        return torch.einsum("...tf,...tsf,...sf->...ts", q, segsum(g).exp(), k)  # [..., L, L]
    b, n = blocks[0], L // blocks[0]
    qb, kb, gb = (x.unflatten(-2, (n, b)) for x in (q, k, g))  # [..., n, b, F]
    into, after, total = block_log_decays(gb)
    skip = between_blocks(total)[..., :n, :, :].exp()  # [..., n, n, F]  0 where j >= i
    q_in = torch.einsum("...icf,...ijf->...ijcf", qb * into.exp(), skip)  # [..., n, n, b, F]
    inter = torch.einsum("...ijcf,...jsf->...ijcs", q_in, kb * after.exp())  # [..., n, n, b, b]
    diag = causal_weights(qb, kb, gb, blocks[1:])  # [..., n, b, b]
    eye = torch.eye(n, dtype=q.dtype, device=q.device)[:, :, None, None]  # [n, n, 1, 1]
    full = inter + eye * diag.unsqueeze(-3)  # [..., n, n, b, b]
    return full.transpose(-3, -2).reshape(*q.shape[:-2], L, L)


def gated_linear_attention_chunk_terms(phi_q, phi_k, v, g, S0, z0, chunk_size: int):
    """Gated linear attention, chunked. phi_*, g: [B, T, H, F]; v: [B, T, H, D]; S0: [B, H, F, D]; z0: [B, H, F].

    Returns num [B, T, H, D], den [B, T, H] and the final LinearState.
    """
    B, T, H, _ = phi_q.shape
    D = v.shape[-1]
    C, c = block_sizes(chunk_size, T)
    N = -(-T // C)
    v1, S1 = with_ones(v, S0, z0)  # [B, T, H, D+1], [B, H, F, D+1]

    def blocks(x):  # [B, T, H, X] -> [B, H, N, C, X]; the padded tail has g = 0 (decay 1) and no key
        return pad_time(x, N * C - T).reshape(B, N, C, H, -1).permute(0, 3, 1, 2, 4)

    q, k, gb, vb = (blocks(x) for x in (phi_q, phi_k, g, v1))  # [B, H, N, C, *]
    into, after, total = block_log_decays(gb)  # [B, H, N, C, F] x 2, [B, H, N, F]
    if bool((total > SAFE_LOG_DECAY).all()):  # G(s, t) = into_t - into_s cannot overflow: one product per chunk
        A = torch.einsum("bhncf,bhnsf->bhncs", q * into.exp(), k * (-into).exp()).tril()  # [B, H, N, C, C]
    else:  # strong decays somewhere (or decay 0): the stable blockwise form
        A = causal_weights(q, k, gb, (c,))  # [B, H, N, C, C]
    kv = (k * after.exp()).transpose(-1, -2) @ vb  # [B, H, N, F, D+1]  each chunk's keys decayed to its end
    carried = torch.einsum("bhnmf,bhmfd->bhnfd", between_blocks(total).exp(), kv)  # [B, H, N+1, F, D+1]
    since_start = torch.cat([torch.zeros_like(total[:, :, :1]), total.cumsum(2)], 2)  # [B, H, N+1, F]
    starts = carried + since_start.exp().unsqueeze(-1) * S1.unsqueeze(2)  # [B, H, N+1, F, D+1]
    out = A @ vb + (q * into.exp()) @ starts[:, :, :-1]  # [B, H, N, C, D+1]
    out = out.permute(0, 2, 3, 1, 4).reshape(B, N * C, H, D + 1)[:, :T]  # [B, T, H, D+1]
    end = starts[:, :, -1]  # [B, H, F, D+1]
    return out[..., :D], out[..., D], LinearState(end[..., :D], end[..., D])
