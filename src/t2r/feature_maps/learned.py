"""Learned maps: T2R's ReLU MLP, Hedgehog's softmax of a projection, Based's 2nd-order Taylor map."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .base import FEATURE_MAPS, FeatureMap, FeatureMapError, _flag, _head_linear, _positive_int


class _LearnedMap(FeatureMap):
    """Per-head projection ``W_h x (+ b_h)``, shared by q and k when ``tie_qk`` else one each."""

    def _create_projection(self, bias: bool, tie_qk: bool) -> None:
        self.tie_qk = _flag("tie_qk", tie_qk)
        shape = (self.num_heads, self.feature_dim, self.head_dim)
        suffixes = ("",) if self.tie_qk else ("", "_k")
        for suffix in suffixes:
            weight = nn.Parameter(torch.empty(shape, dtype=torch.float32))  # (H, F, D)
            self.register_parameter("weight" + suffix, weight)
            b = nn.Parameter(torch.empty(shape[:2], dtype=torch.float32)) if bias else None  # (H, F)
            self.register_parameter("bias" + suffix, b)

    def _projections(self) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        pairs = [(self.weight, self.bias)]
        return pairs if self.tie_qk else pairs + [(self.weight_k, self.bias_k)]

    def _project(self, x: torch.Tensor, is_key: bool) -> torch.Tensor:
        weight, bias = self._projections()[1 if is_key and not self.tie_qk else 0]
        return _head_linear(x, weight, bias)  # (..., H, F)


@FEATURE_MAPS.register("t2r")
class T2RFeatureMap(_LearnedMap):
    def __init__(self, num_heads: int, head_dim: int, feature_dim: int | None = None, *, tie_qk: bool = True):
        width = _positive_int("feature_dim", 32 if feature_dim is None else feature_dim)
        super().__init__(num_heads, head_dim, width, out_dim=width)
        self._create_projection(bias=True, tie_qk=tie_qk)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # nn.Linear's init for both W and b. A random (rather than zero) bias means phi(0) != 0:
        # tokens whose q/k has a small norm still have active units instead of an all-zero feature
        # (which would leave only eps in the denominator), and units are not all cut by one hyperplane.
        bound = 1.0 / math.sqrt(self.head_dim)
        for weight, bias in self._projections():
            nn.init.uniform_(weight, -bound, bound)
            nn.init.uniform_(bias, -bound, bound)

    def options(self) -> dict[str, Any]:
        return {"tie_qk": self.tie_qk}

    def phi(self, x: torch.Tensor, is_key: bool) -> torch.Tensor:
        return F.relu(self._project(x, is_key))  # (..., H, F)


@FEATURE_MAPS.register("hedgehog")
class HedgehogFeatureMap(_LearnedMap):
    def __init__(
        self, num_heads: int, head_dim: int, feature_dim: int | None = None, *, tie_qk: bool = False
    ):
        width = _positive_int("feature_dim", 64 if feature_dim is None else feature_dim)
        super().__init__(num_heads, head_dim, width, out_dim=2 * width)
        self._create_projection(bias=True, tie_qk=tie_qk)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            for weight, bias in self._projections():
                eye = torch.eye(self.feature_dim, self.head_dim, device=weight.device)  # (F, D)
                weight.copy_(eye.expand_as(weight))  # (H, F, D)
                bias.zero_()

    def options(self) -> dict[str, Any]:
        return {"tie_qk": self.tie_qk}

    def phi(self, x: torch.Tensor, is_key: bool) -> torch.Tensor:
        u = self._project(x, is_key)  # (..., H, F)
        return torch.cat([torch.softmax(u, dim=-1), torch.softmax(-u, dim=-1)], dim=-1)  # (..., H, 2F)


@FEATURE_MAPS.register("taylor")
class TaylorFeatureMap(_LearnedMap):
    def __init__(
        self,
        num_heads: int,
        head_dim: int,
        feature_dim: int | None = None,
        *,
        project: bool = True,
        tie_qk: bool = True,
    ):
        project = _flag("project", project)
        feature_dim = None if feature_dim is None else _positive_int("feature_dim", feature_dim)
        if not project and feature_dim not in (None, head_dim):
            raise FeatureMapError(
                f"taylor with project=False uses feature_dim = head_dim = {head_dim}; "
                f"pass feature_dim=None or {head_dim}, or project=True, got feature_dim={feature_dim!r}"
            )
        feature_dim = (16 if project else head_dim) if feature_dim is None else feature_dim
        width = _positive_int("feature_dim", feature_dim)
        super().__init__(num_heads, head_dim, width, out_dim=1 + width + width * width)
        self.project = project
        self.tie_qk = _flag("tie_qk", tie_qk)
        self.has_projection = project and width != head_dim
        if self.has_projection:
            self._create_projection(bias=False, tie_qk=tie_qk)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.has_projection:
            for weight, _ in self._projections():
                _init_norm_preserving_(weight)

    def options(self) -> dict[str, Any]:
        return {"project": self.project, "tie_qk": self.tie_qk}

    def phi(self, x: torch.Tensor, is_key: bool) -> torch.Tensor:
        x = self._project(x, is_key) if self.has_projection else x  # (..., H, F)
        x = x * self.feature_dim**-0.25  # (..., H, F)
        outer = (x.unsqueeze(-1) * x.unsqueeze(-2)).flatten(-2) * 2**-0.5  # (..., H, F*F)
        return torch.cat([torch.ones_like(x[..., :1]), x, outer], dim=-1)  # (..., H, 1+F+F*F)


def _init_norm_preserving_(weight: torch.Tensor) -> None:
    """Random semi-orthogonal rows per head, scaled so that E|P x| = |x| for random x."""
    if weight.is_meta:
        return
    heads, rows, cols = weight.shape
    tall = torch.randn(heads, max(rows, cols), min(rows, cols), device=weight.device)  # (H, big, small)
    q, _ = torch.linalg.qr(tall)  # (H, big, small), orthonormal columns
    p = q if rows >= cols else q.transpose(-1, -2)  # (H, F, D)
    with torch.no_grad():
        weight.copy_(p * math.sqrt(max(cols / rows, 1.0)))  # (H, F, D)
