"""Public entry points of (causal or non-causal) linear attention: checks, float32 upcast, dispatch."""

from __future__ import annotations

import torch

from ..common import LinearState, acc, check_key_mask, check_mode, check_rank4, check_same_last, check_state, guard
from .chunk import linear_attention_chunk_terms
from .naive import linear_attention_noncausal_terms, linear_attention_quadratic_terms
from .recurrent import linear_attention_recurrent_terms


def check_linear_inputs(phi_q, phi_k, v, key_mask, initial_state, mode, chunk_size) -> None:
    """The checks every linear-attention op shares (the gated one adds its decays)."""
    check_mode(mode, chunk_size)
    check_rank4(phi_q=phi_q, phi_k=phi_k, v=v)
    check_same_last("phi_q", phi_q, "phi_k", phi_k)
    check_key_mask(key_mask, *phi_k.shape[:2])
    if initial_state is not None:
        B, _, H, F = phi_k.shape
        expected = {"S": (B, H, F, v.shape[-1]), "z": (B, H, F)}
        check_state("LinearState", initial_state, LinearState._fields, expected)


def start_state(initial_state, phi_k: torch.Tensor, D: int):
    """(S0 [B, H, F, D], z0 [B, H, F]) in the accumulation dtype: the given LinearState, or zeros."""
    if initial_state is None:
        B, _, H, F = phi_k.shape
        return phi_k.new_zeros(B, H, F, D), phi_k.new_zeros(B, H, F)
    return tuple(acc(x) for x in initial_state)


def linear_attention_terms(
    phi_q: torch.Tensor,
    phi_k: torch.Tensor,
    v: torch.Tensor,
    *,
    key_mask: torch.Tensor | None = None,
    causal: bool = True,
    mode: str = "chunk",
    chunk_size: int = 64,
    initial_state=None,
    output_final_state: bool = False,
    eps: float = 1e-6,
):
    """Unnormalised linear attention: (num [B, T, H, D] f32, den [B, T, H] f32, LinearState or None).

    Same arguments as `linear_attention` (eps is accepted for a uniform signature and unused here).
    """
    check_linear_inputs(phi_q, phi_k, v, key_mask, initial_state, mode, chunk_size)
    phi_q, phi_k, v32 = acc(phi_q), acc(phi_k), acc(v)
    if key_mask is not None:  # padding adds nothing to the state
        phi_k = torch.where(key_mask[:, :, None, None], phi_k, 0.0)  # [B, T, H, F]
    S0, z0 = start_state(initial_state, phi_k, v.shape[-1])
    if not causal:
        num, den, state = linear_attention_noncausal_terms(phi_q, phi_k, v32, S0, z0)
    elif mode == "chunk":
        num, den, state = linear_attention_chunk_terms(phi_q, phi_k, v32, S0, z0, chunk_size)
    elif mode == "recurrent":
        num, den, state = linear_attention_recurrent_terms(phi_q, phi_k, v32, S0, z0)
    else:
        num, den, state = linear_attention_quadratic_terms(phi_q, phi_k, v32, S0, z0)
    return num, den, (state if output_final_state else None)


def linear_attention(
    phi_q: torch.Tensor,
    phi_k: torch.Tensor,
    v: torch.Tensor,
    *,
    key_mask: torch.Tensor | None = None,
    causal: bool = True,
    mode: str = "chunk",
    chunk_size: int = 64,
    initial_state=None,
    output_final_state: bool = False,
    eps: float = 1e-6,
):
    """Linear attention o_t = phi(q_t)^T S_t / guard(phi(q_t)^T z_t), accumulated in float32.

    phi_q, phi_k: [B, T, H, F]; v: [B, T, H, D]; key_mask: [B, T] bool (True = real token; padded keys add
    nothing to the state) or None; initial_state: LinearState(S [B, H, F, D], z [B, H, F]) or None.
    causal=True sums keys j <= t (mode "chunk" | "recurrent" | "quadratic"); causal=False sums all keys (mode
    ignored). guard(d) = d + eps if d >= 0 else d - eps.
    Returns (o [B, T, H, D] in v.dtype, LinearState of float32 tensors if output_final_state else None).
    """
    num, den, state = linear_attention_terms(
        phi_q, phi_k, v, key_mask=key_mask, causal=causal, mode=mode, chunk_size=chunk_size,
        initial_state=initial_state, output_final_state=output_final_state, eps=eps,
    )
    o = num / guard(den, eps).unsqueeze(-1)  # [B, T, H, D]
    return o.to(v.dtype), state
