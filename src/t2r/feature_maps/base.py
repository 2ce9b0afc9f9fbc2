"""The feature-map base class, the registry and the argument checks shared by every map."""

from __future__ import annotations

import inspect
from numbers import Integral
from typing import Any

import torch
from torch import nn

from ..registry import Registry


class FeatureMapError(ValueError):
    """A feature map was asked for with bad arguments; the message says what to change."""


FEATURE_MAPS = Registry("feature map", FeatureMapError)

_COMMON_ARGS = ("num_heads", "head_dim", "feature_dim")


def build_feature_map(
    name: str, num_heads: int, head_dim: int, feature_dim: int | None = None, **options: Any
) -> FeatureMap:
    """Build the feature map registered as ``name``; ``feature_dim=None`` takes the map's default."""
    cls = FEATURE_MAPS.get(name)
    accepted = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", *_COMMON_ARGS)]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise FeatureMapError(
            f"feature map '{name}' got unknown option(s) {', '.join(unknown)}; "
            f"it accepts: {', '.join(accepted) or 'no options'}"
        )
    return cls(num_heads, head_dim, feature_dim, **options)


def _positive_int(what: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral) or value <= 0:
        raise FeatureMapError(f"{what} must be a positive integer, got {value!r}")
    return int(value)


def _flag(what: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise FeatureMapError(f"{what} must be True or False, got {value!r}")
    return value


def _head_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Per-head projection in x's dtype (float32 or wider): a model cast to bf16 / fp16 keeps computing its maps in
    float32, its parameters cast up here."""
    u = torch.einsum("...hd,hfd->...hf", x, weight.to(x.dtype))  # (..., H, F)
    return u if bias is None else u + bias.to(x.dtype)  # (..., H, F)


class FeatureMap(nn.Module):
    """Base class: validates sizes and inputs, casts to float32, applies ``phi`` to q and k. The maps compute in
    float32 whatever the model's dtype (a bf16 / fp16 model's map parameters are cast up), and return float32."""

    name: str = ""

    def __init__(self, num_heads: int, head_dim: int, feature_dim: int, out_dim: int):
        super().__init__()
        self.num_heads = _positive_int("num_heads", num_heads)
        self.head_dim = _positive_int("head_dim", head_dim)
        self.feature_dim = _positive_int("feature_dim", feature_dim)
        self.out_dim = out_dim

    def forward(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q, k = self._as_float(q, "q"), self._as_float(k, "k")  # (B, T, H, D)
        return self.phi(q, is_key=False), self.phi(k, is_key=True)  # (B, T, H, out_dim)

    def phi(self, x: torch.Tensor, is_key: bool) -> torch.Tensor:
        """phi of a validated float32 ``[..., H, D]`` tensor; ``is_key`` picks the k weights if untied."""
        raise NotImplementedError

    def options(self) -> dict[str, Any]:
        """The map-specific constructor options, JSON-serialisable."""
        return {}

    def config(self) -> dict[str, Any]:
        """Kwargs such that ``build_feature_map(**config)`` rebuilds this architecture."""
        common = {"name": self.name, "num_heads": self.num_heads, "head_dim": self.head_dim}
        return {**common, "feature_dim": self.feature_dim, **self.options()}

    def reset_parameters(self) -> None:
        """(Re-)initialise parameters and buffers; a no-op for maps without state."""

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.config().items() if k != "name")

    def _as_float(self, x: torch.Tensor, role: str) -> torch.Tensor:
        expected = (self.num_heads, self.head_dim)
        if x.dim() < 2 or tuple(x.shape[-2:]) != expected:
            raise FeatureMapError(
                f"feature map '{self.name}' expects {role} of shape [B, T, H={expected[0]}, "
                f"D={expected[1]}], got {list(x.shape)}"
            )
        return x.to(torch.promote_types(x.dtype, torch.float32))  # float64 stays float64 (checks)
