"""The delta rule and the gated delta rule (DeltaNet / Gated DeltaNet), pure torch: checks, float32 upcast, dispatch.

S_t = a_t (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T, o_t = S_t^T q_t, a_t = exp(log_decay_t) (1 if None).

delta_rule                   the recurrence (chunk | recurrent | quadratic); recurrent is the slow twin
delta_rule_weights           the [B, H, T, T] matrix A with o = A v from a zero state (attention transfer)
sliding_window_delta_rule    softmax over the last `window` keys beside a delta memory of the older ones
"""

from __future__ import annotations

import torch

from ..common import DeltaState, acc, check_key_mask, check_mode, check_rank4, check_same_last, check_state
from .chunk import delta_rule_chunk
from .gates import check_gates, prepare_gates, zero_padded
from .naive import delta_rule_quadratic, delta_rule_weights_quadratic
from .recurrent import delta_rule_recurrent
from .window import sliding_window_delta_rule

FORMS = {"chunk": delta_rule_chunk, "recurrent": delta_rule_recurrent, "quadratic": delta_rule_quadratic}


def _check_inputs(q, k, v, beta, log_decay, key_mask, initial_state, mode, chunk_size) -> None:
    check_mode(mode, chunk_size)
    check_rank4(q=q, k=k, v=v)
    check_same_last("q", q, "k", k)
    B, T, H, F = k.shape
    check_gates(beta, log_decay, B, T, H)
    check_key_mask(key_mask, B, T)
    if initial_state is not None:
        check_state("DeltaState", initial_state, DeltaState._fields, {"S": (B, H, F, v.shape[-1])})


def delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    *,
    log_decay: torch.Tensor | None = None,
    key_mask: torch.Tensor | None = None,
    mode: str = "chunk",
    chunk_size: int = 64,
    initial_state=None,
    output_final_state: bool = False,
):
    """The (gated) delta rule S_t = a_t S_{t-1} + beta_t k_t (v_t - a_t S_{t-1}^T k_t)^T, o_t = S_t^T q_t.

    q, k: [B, T, H, F] (L2-normalise them first: the op does not); v: [B, T, H, D]; beta: [B, T, H] in [0, 1];
    log_decay: [B, T, H] (<= 0, -inf = decay 0) or None (decay 1); key_mask: [B, T] bool (True = real token; a
    padded step leaves the state unchanged) or None; initial_state: DeltaState(S [B, H, F, D]) or None (zeros).
    mode: "chunk" (UT transform per chunk_size tokens) | "recurrent" (token loop) | "quadratic" (T x T closed form).
    Returns (o [B, T, H, D] in v.dtype, DeltaState of float32 tensors if output_final_state else None).
    """
    _check_inputs(q, k, v, beta, log_decay, key_mask, initial_state, mode, chunk_size)
    B, _, H, F = k.shape
    b32, g32 = (x.transpose(1, 2) for x in prepare_gates(beta, log_decay, key_mask))  # [B, H, T]
    k32, v32 = (zero_padded(x, key_mask).transpose(1, 2) for x in (k, v))  # [B, H, T, *]
    q32 = acc(q).transpose(1, 2)  # [B, H, T, F]
    if initial_state is None:
        S0 = k32.new_zeros(B, H, F, v.shape[-1])  # [B, H, F, D]
    else:
        S0 = acc(initial_state[0])  # [B, H, F, D]
    args = (q32, k32, v32, b32, g32, S0) + ((chunk_size,) if mode == "chunk" else ())
    o, state = FORMS[mode](*args)  # [B, H, T, D]
    return o.transpose(1, 2).to(v.dtype), (state if output_final_state else None)


def delta_rule_weights(q: torch.Tensor, k: torch.Tensor, beta: torch.Tensor, log_decay: torch.Tensor | None = None):
    """The float32 matrix A [B, H, T, T] with delta_rule(q, k, v, beta, log_decay=...)[0] == A @ v from a zero state.

    A = (Q K^T o Gamma) (I + L)^-1 diag(beta), L_ts = beta_t (k_t . k_s) Gamma_ts for s < t, Gamma_ts the decay
    from s to t: lower triangular, entries may be negative. Arguments as in delta_rule (no padding).
    """
    check_rank4(q=q, k=k)
    check_same_last("q", q, "k", k)
    check_gates(beta, log_decay, *k.shape[:3])
    b32, g32 = (x.transpose(1, 2) for x in prepare_gates(beta, log_decay, None))  # [B, H, T]
    return delta_rule_weights_quadratic(acc(q).transpose(1, 2), acc(k).transpose(1, 2), b32, g32)


__all__ = ["DeltaState", "delta_rule", "delta_rule_weights", "sliding_window_delta_rule"]
