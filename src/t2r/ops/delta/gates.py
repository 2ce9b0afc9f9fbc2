"""Checks and float32 preparation of the per-token gates (beta, log decay) and of padded steps, shared by
delta_rule and the sliding-window hybrid. A padded step (key_mask False) gets beta 0 and decay 1 (log decay 0),
and its key and value are zeroed (NaN too): it leaves the state unchanged."""

from __future__ import annotations

import torch

from ..common import acc, shape_of


def check_gates(beta, log_decay, B: int, T: int, H: int) -> None:
    """beta (and log_decay when given) are tensors of shape (B, T, H)."""
    for name, x in (("beta", beta), ("log_decay", log_decay)):
        if x is None and name == "log_decay":
            continue
        if not isinstance(x, torch.Tensor) or shape_of(x) != (B, T, H):
            got = shape_of(x) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"{name} must be a tensor of shape ({B}, {T}, {H}) (one gate per token and head), got {got}")


def zero_padded(x: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """x [B, T, ...] in float32 with the steps where valid [B, T] is False set to 0 (NaN too)."""
    x = acc(x)
    if valid is None:
        return x
    return torch.where(valid.view(*valid.shape, *(1,) * (x.dim() - 2)), x, 0.0)


def prepare_gates(beta, log_decay, valid):
    """float32 (beta, g) [B, T, H]: g = 0 (decay 1) when log_decay is None; padded steps get beta 0 and g 0."""
    g = torch.zeros_like(acc(beta)) if log_decay is None else log_decay
    return zero_padded(beta, valid), zero_padded(g, valid)
