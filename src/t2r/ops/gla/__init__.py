"""Entry points of gated linear attention (GLA): checks, float32 upcast, dispatch to the chunked (chunk.py),
recurrent (recurrent.py) and quadratic (naive.py) forms.

    S_t = diag(exp(g_t)) S_{t-1} + phi_k_t v_t^T,   z_t = exp(g_t) * z_{t-1} + phi_k_t,
    o_t = phi_q_t^T S_t / guard(phi_q_t . z_t),
with log decays g <= 0 per step, head and feature (or per step and head); g = 0 is plain linear attention, g = -inf
forgets everything before the step.
"""

from __future__ import annotations

import torch

from ..common import acc, check_key_mask, check_mode, check_rank4, check_same_last, guard
from ..linear import check_linear_inputs, start_state
from ..linear.chunk import pad_time
from .chunk import block_sizes, causal_weights, gated_linear_attention_chunk_terms
from .naive import gated_linear_attention_quadratic_terms
from .recurrent import gated_linear_attention_recurrent_terms


def check_log_decay(log_decay, phi_k: torch.Tensor) -> None:
    """log_decay is a float tensor [B, T, H, F] or [B, T, H] matching phi_k [B, T, H, F] (values are not scanned)."""
    B, T, H, F = phi_k.shape
    if (not isinstance(log_decay, torch.Tensor) or not log_decay.is_floating_point()
            or tuple(log_decay.shape) not in ((B, T, H, F), (B, T, H))):
        got = f"{log_decay.dtype} {tuple(log_decay.shape)}" if isinstance(log_decay, torch.Tensor) else log_decay
        raise ValueError(f"log_decay must be a float tensor of shape ({B}, {T}, {H}, {F}) or ({B}, {T}, {H}) "
                         f"(the log of each step's decay, <= 0; -inf forgets), got {got}")


def full_log_decay(log_decay: torch.Tensor, phi_k: torch.Tensor, step_ok) -> torch.Tensor:
    """log_decay as an accumulation-dtype [B, T, H, F] tensor, 0 (decay 1) at the steps where step_ok
    ([B, T] bool or None) is False."""
    g = acc(log_decay)
    if g.dim() == 3:  # one decay per head
        g = g.unsqueeze(-1).expand(phi_k.shape)  # [B, T, H, F]
    if step_ok is not None:
        g = torch.where(step_ok[:, :, None, None], g, 0.0)  # [B, T, H, F]
    return g


def _check_inputs(phi_q, phi_k, v, log_decay, key_mask, initial_state, mode, chunk_size) -> None:
    check_linear_inputs(phi_q, phi_k, v, key_mask, initial_state, mode, chunk_size)
    check_log_decay(log_decay, phi_k)


def gated_linear_attention_terms(
    phi_q: torch.Tensor,
    phi_k: torch.Tensor,
    v: torch.Tensor,
    log_decay: torch.Tensor,
    *,
    key_mask: torch.Tensor | None = None,
    mode: str = "chunk",
    chunk_size: int = 64,
    initial_state=None,
    output_final_state: bool = False,
    eps: float = 1e-6,
):
    """Unnormalised gated linear attention: (num [B, T, H, D] f32, den [B, T, H] f32, LinearState or None).

    Same arguments as `gated_linear_attention` (eps is accepted for a uniform signature and unused here).
    """
    _check_inputs(phi_q, phi_k, v, log_decay, key_mask, initial_state, mode, chunk_size)
    g = full_log_decay(log_decay, phi_k, key_mask)  # [B, T, H, F]
    phi_q, phi_k, v32 = acc(phi_q), acc(phi_k), acc(v)
    if key_mask is not None:  # padding adds nothing to the state (and, with g = 0 there, does not decay it)
        step_ok = key_mask[:, :, None, None]  # [B, T, 1, 1]
        phi_k, v32 = torch.where(step_ok, phi_k, 0.0), torch.where(step_ok, v32, 0.0)  # [B, T, H, *]
    S0, z0 = start_state(initial_state, phi_k, v.shape[-1])
    if mode == "chunk":
        num, den, state = gated_linear_attention_chunk_terms(phi_q, phi_k, v32, g, S0, z0, chunk_size)
    elif mode == "recurrent":
        num, den, state = gated_linear_attention_recurrent_terms(phi_q, phi_k, v32, g, S0, z0)
    else:
        num, den, state = gated_linear_attention_quadratic_terms(phi_q, phi_k, v32, g, S0, z0)
    return num, den, (state if output_final_state else None)


def gated_linear_attention(
    phi_q: torch.Tensor,
    phi_k: torch.Tensor,
    v: torch.Tensor,
    log_decay: torch.Tensor,
    *,
    key_mask: torch.Tensor | None = None,
    mode: str = "chunk",
    chunk_size: int = 64,
    initial_state=None,
    output_final_state: bool = False,
    eps: float = 1e-6,
    normalize: bool = True,
):
    """Gated linear attention o_t = phi_q_t^T S_t / guard(phi_q_t . z_t), accumulated in float32.

    phi_q, phi_k: [B, T, H, F]; v: [B, T, H, D]; log_decay: [B, T, H, F] or [B, T, H] (one decay per head), the log
    of each step's decay: <= 0, -inf allowed (forget); values are not checked. key_mask: [B, T] bool (True = real
    token; a padded step neither adds its key nor decays the state) or None. initial_state: LinearState(S [B, H, F, D],
    z [B, H, F]) or None. mode: "chunk" | "recurrent" | "quadratic"; chunk_size is rounded up to a multiple of 8.
    normalize=False returns the numerator phi_q_t^T S_t. guard(d) = d + eps if d >= 0 else d - eps.
    Returns (o [B, T, H, D] in v.dtype, LinearState of float32 tensors if output_final_state else None).
    """
    num, den, state = gated_linear_attention_terms(
        phi_q, phi_k, v, log_decay, key_mask=key_mask, mode=mode, chunk_size=chunk_size,
        initial_state=initial_state, output_final_state=output_final_state, eps=eps,
    )
    o = num / guard(den, eps).unsqueeze(-1) if normalize else num  # [B, T, H, D]
    return o.to(v.dtype), state


def gated_linear_attention_weights(
    phi_q: torch.Tensor,
    phi_k: torch.Tensor,
    log_decay: torch.Tensor,
    *,
    key_mask: torch.Tensor | None = None,
    chunk_size: int = 64,
) -> torch.Tensor:
    """The unnormalised weights [B, H, T, T] (float32) that query t gives key j, from a zero initial state:
    phi_q_t . (prod_{j<i<=t} exp(g_i)) phi_k_j for j <= t, 0 above the diagonal. Their sum over j is `den`, and
    weights @ v is `num` of `gated_linear_attention_terms`. Arguments as there; memory O(T^2 (1 + F / chunk_size)).
    """
    check_mode("chunk", chunk_size)
    check_rank4(phi_q=phi_q, phi_k=phi_k)
    check_same_last("phi_q", phi_q, "phi_k", phi_k)
    check_log_decay(log_decay, phi_k)
    check_key_mask(key_mask, *phi_k.shape[:2])
    T = phi_k.shape[1]
    g = full_log_decay(log_decay, phi_k, key_mask)  # [B, T, H, F]
    phi_q, phi_k = acc(phi_q), acc(phi_k)
    if key_mask is not None:
        phi_k = torch.where(key_mask[:, :, None, None], phi_k, 0.0)  # [B, T, H, F]
    C, c = block_sizes(chunk_size, T)
    pad = -T % C
    q, k, g = (pad_time(x, pad).transpose(1, 2) for x in (phi_q, phi_k, g))  # [B, H, T', F]
    return causal_weights(q, k, g, (C, c))[..., :T, :T]  # [B, H, T, T]
