"""Entry point of the sliding softmax window + linear attention hybrid (LoLCATs-style): checks, float32 upcast,
dispatch to the chunked (chunk.py), recurrent (recurrent.py) and quadratic (naive.py) forms. With log_decay the
linear part is gated (gated linear attention over the keys that left the window)."""

from __future__ import annotations

import torch

from ..common import WindowState, acc, check_key_mask, check_mode, check_rank4, check_same_last, check_state, guard
from ..gla import check_log_decay, full_log_decay
from .chunk import sliding_window_chunk_terms
from .naive import sliding_window_quadratic_terms
from .recurrent import sliding_window_recurrent_terms


def _check_inputs(q, k, v, phi_q, phi_k, window, window_factor, log_decay, key_mask, initial_state, mode, chunk_size):
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
    if log_decay is not None:
        check_log_decay(log_decay, phi_k)
    check_key_mask(key_mask, B, T)
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
        f32 = {"dtype": torch.float32, "device": device}
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
    log_decay: torch.Tensor | None = None,
    key_mask: torch.Tensor | None = None,
    mode: str = "chunk",
    chunk_size: int = 64,
    initial_state=None,
    output_final_state: bool = False,
    eps: float = 1e-6,
):
    """Sliding softmax window over the last `window` keys + linear attention over the older ones.

    q, k: [B, T, H, Dk] (after positions); v: [B, T, H, D]; phi_q, phi_k: [B, T, H, F];
    window_factor: [H] in (0, 1); log_decay: None (plain linear part) or [B, T, H, F] | [B, T, H] log decays <= 0:
    the state of the keys older than the window decays by exp(log_decay_t) at every step t, so query t weighs an
    old key j by (1 - f) phi_q_t . prod_{j+window<i<=t} exp(log_decay_i) phi_k_j (padded steps: decay 1);
    key_mask: [B, T] bool (True = real token) or None;
    initial_state: WindowState or None; mode: "chunk" | "recurrent" | "quadratic".
    Returns (o [B, T, H, D] in v.dtype, WindowState if output_final_state else None); buffers k, v
    keep the dtypes of k, v; S, z, phi_k are float32.
    """
    _check_inputs(q, k, v, phi_q, phi_k, window, window_factor, log_decay, key_mask, initial_state, mode, chunk_size)
    B, T, H, Dk = k.shape
    valid = key_mask if key_mask is not None else torch.ones(B, T, dtype=torch.bool, device=k.device)
    step_ok = valid[:, :, None, None]  # [B, T, 1, 1]
    k32, v32, pk32 = (_zero_invalid(x, step_ok) for x in (k, v, phi_k))  # [B, T, H, *]
    args = (acc(q), k32, v32, acc(phi_q), pk32, window, acc(window_factor), scale, valid)
    g = None if log_decay is None else full_log_decay(log_decay, phi_k, valid)  # [B, T, H, F], 0 where padded
    if mode == "quadratic" and initial_state is None:
        num, den, state = sliding_window_quadratic_terms(*args, None, g=g)
    else:
        start = _start_state(initial_state, B, H, window, Dk, v.shape[-1], phi_k.shape[-1], k.device)
        if mode == "chunk":
            num, den, state = sliding_window_chunk_terms(*args, start, chunk_size, g=g)
        elif mode == "recurrent":
            num, den, state = sliding_window_recurrent_terms(*args, start, g=g)
        else:
            num, den, state = sliding_window_quadratic_terms(*args, start, g=g)
    o = (num / guard(den, eps).unsqueeze(-1)).to(v.dtype)  # [B, T, H, D]
    if not output_final_state:
        return o, None
    return o, state._replace(k=state.k.to(k.dtype), v=state.v.to(v.dtype))
