"""Pieces shared by every op: the state tuples, the guarded division, the softmax window weights,
and the input checks (each raises ValueError with a message that names the offending argument)."""

from __future__ import annotations

from typing import NamedTuple

import torch

MODES = ("chunk", "recurrent", "quadratic")


class LinearState(NamedTuple):
    """Recurrent state of linear attention (float32); unpacks as ``S, z = state``."""

    S: torch.Tensor  # [B, H, F, D]  sum of phi(k_j) v_j^T
    z: torch.Tensor  # [B, H, F]     sum of phi(k_j)


class WindowState(NamedTuple):
    """State of the sliding-window + linear hybrid after the token at position L.

    S, z sum the keys j <= L - window; the buffers hold the tokens j in (L - window, L], oldest first,
    left-padded with ``valid=False`` at the start of a stream.
    """

    S: torch.Tensor  # [B, H, F, D] float32
    z: torch.Tensor  # [B, H, F] float32
    k: torch.Tensor  # [B, H, window, Dk]
    v: torch.Tensor  # [B, H, window, D]
    phi_k: torch.Tensor  # [B, H, window, F] float32
    valid: torch.Tensor  # [B, window] bool


class DeltaState(NamedTuple):
    """Recurrent state of the (gated) delta rule (float32): the fast-weight memory S_t, read as o_t = S_t^T q_t.

    S_t = a_t (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T; unpacks as ``(S,) = state``.
    """

    S: torch.Tensor  # [B, H, F, D]


class DeltaWindowState(NamedTuple):
    """State of the sliding-window + delta-rule hybrid after the token at position L.

    S is the delta memory holding the keys j <= L - window; the buffers hold the tokens j in (L - window, L],
    oldest first, left-padded with ``valid=False`` (and beta 0) at the start of a stream.
    """

    S: torch.Tensor  # [B, H, F, D] float32
    k: torch.Tensor  # [B, H, window, Dk]
    v: torch.Tensor  # [B, H, window, D]
    phi_k: torch.Tensor  # [B, H, window, F] float32
    beta: torch.Tensor  # [B, H, window] float32
    valid: torch.Tensor  # [B, window] bool


def acc(x: torch.Tensor) -> torch.Tensor:
    """x in the accumulation dtype: float32, or float64 when x already is (half types are upcast)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def guard(den: torch.Tensor, eps: float) -> torch.Tensor:
    """Push a denominator away from zero by eps, keeping its sign (0 counts as positive)."""
    return torch.where(den >= 0, den + eps, den - eps)


def window_weights(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """exp(s - m) on the masked-in scores, 0 elsewhere; m = max of the masked-in scores (0 if none).

    scores: [..., R]; mask: bool, broadcastable to scores. Never NaN, also for an all-False row.
    """
    s = scores.masked_fill(~mask, float("-inf"))  # [..., R]
    m = s.amax(dim=-1, keepdim=True)  # [..., 1]
    m = m.masked_fill(m == float("-inf"), 0.0)  # [..., 1]
    return torch.exp(s - m)  # [..., R]


def shape_of(x: torch.Tensor) -> tuple:
    return tuple(x.shape)


def check_mode(mode: str, chunk_size: int) -> None:
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; known modes: {', '.join(MODES)}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")


def check_rank4(**tensors: torch.Tensor) -> None:
    """Every tensor is [B, T, H, *] and they agree on B, T and H."""
    for name, x in tensors.items():
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            got = shape_of(x) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"{name} must be a 4-d tensor [B, T, H, dim], got {got}")
    names = list(tensors)
    first = tensors[names[0]]
    for name in names[1:]:
        if tensors[name].shape[:3] != first.shape[:3]:
            raise ValueError(
                f"{names[0]} and {name} must agree on [B, T, H]: "
                f"{shape_of(first)[:3]} vs {shape_of(tensors[name])[:3]}"
            )


def check_same_last(a_name: str, a: torch.Tensor, b_name: str, b: torch.Tensor) -> None:
    if a.shape[-1] != b.shape[-1]:
        raise ValueError(
            f"{a_name} and {b_name} must have the same feature size (last dim): "
            f"{a.shape[-1]} vs {b.shape[-1]}"
        )


def check_key_mask(key_mask, B: int, T: int) -> None:
    if key_mask is not None and (not isinstance(key_mask, torch.Tensor) or key_mask.dtype != torch.bool
                                 or tuple(key_mask.shape) != (B, T)):
        got = f"{key_mask.dtype} {tuple(key_mask.shape)}" if isinstance(key_mask, torch.Tensor) else key_mask
        raise ValueError(f"key_mask must be a bool tensor of shape ({B}, {T}) (True = real token), got {got}")


def check_state(kind: str, state, fields: tuple, expected: dict) -> None:
    """state unpacks into len(fields) tensors whose shapes equal expected[field]."""
    if not isinstance(state, (tuple, list)) or len(state) != len(fields):
        raise ValueError(f"initial_state must be a {kind} ({', '.join(fields)}), got {type(state).__name__}")
    for name, x in zip(fields, state):
        if not isinstance(x, torch.Tensor) or shape_of(x) != expected[name]:
            got = shape_of(x) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"initial_state.{name} must have shape {expected[name]}, got {got}")
