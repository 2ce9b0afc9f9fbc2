"""Fixed random-feature maps: RFA's random Fourier features and Performer's positive orthogonal features."""

from __future__ import annotations

from numbers import Integral, Real
from typing import Any

import torch

from .base import FEATURE_MAPS, FeatureMap, FeatureMapError, _flag, _positive_int

PERFORMER_MAX_EXPONENT = 30.0  # exp(30) ~ 1e13: finite in float32, even summed over long sequences
RFA_NORM_EPS = 1e-6


class _RandomFeatureMap(FeatureMap):
    """A fixed random matrix ``weight: [H, m, D]`` (persistent buffer drawn from ``seed``).

    Subclasses set their own options, then call ``reset_parameters()`` at the end of ``__init__``.

    With ``redraw=True`` a training-mode forward draws a fresh matrix from the global RNG and uses
    it for both q and k of that call; the stored buffer is left unchanged, so eval stays reproducible.
    """

    def __init__(
        self, num_heads: int, head_dim: int, num_features: int, out_dim: int, seed: int, redraw: bool
    ):
        super().__init__(num_heads, head_dim, num_features, out_dim=out_dim)
        if isinstance(seed, bool) or not isinstance(seed, Integral) or seed < 0:
            raise FeatureMapError(f"seed must be a non-negative integer, got {seed!r}")
        self.seed = int(seed)
        self.redraw = _flag("redraw", redraw)
        shape = (self.num_heads, self.feature_dim, self.head_dim)
        self.register_buffer("weight", torch.empty(shape, dtype=torch.float32), persistent=True)  # (H, m, D)

    def reset_parameters(self) -> None:
        if self.weight.is_meta:
            return
        generator = torch.Generator(device="cpu").manual_seed(self.seed)
        with torch.no_grad():
            self.weight.copy_(self.draw(generator, torch.device("cpu")))  # (H, m, D)

    def draw(self, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
        raise NotImplementedError

    def features(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q, k = self._as_float(q, "q"), self._as_float(k, "k")  # (B, T, H, D)
        weight = self.draw(None, self.weight.device) if self.redraw and self.training else self.weight
        return self.features(q, weight), self.features(k, weight)  # (B, T, H, out_dim)

    def phi(self, x: torch.Tensor, is_key: bool) -> torch.Tensor:
        return self.features(x, self.weight)  # (..., H, out_dim), with the stored matrix


@FEATURE_MAPS.register("rfa")
class RFAFeatureMap(_RandomFeatureMap):
    def __init__(
        self,
        num_heads: int,
        head_dim: int,
        feature_dim: int | None = None,
        *,
        sigma: float = 1.0,
        seed: int = 0,
        redraw: bool = False,
    ):
        if isinstance(sigma, bool) or not isinstance(sigma, Real) or not sigma > 0:
            raise FeatureMapError(f"sigma must be a positive number, got {sigma!r}")
        m = _positive_int("feature_dim", 32 if feature_dim is None else feature_dim)
        super().__init__(num_heads, head_dim, m, out_dim=2 * m, seed=seed, redraw=redraw)
        self.sigma = float(sigma)
        self.reset_parameters()

    def options(self) -> dict[str, Any]:
        return {"sigma": self.sigma, "seed": self.seed, "redraw": self.redraw}

    def draw(self, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
        shape = (self.num_heads, self.feature_dim, self.head_dim)
        return torch.randn(shape, generator=generator, device=device) / self.sigma  # (H, m, D)

    def features(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        x = x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) + RFA_NORM_EPS)  # (..., H, D), unit norm
        u = torch.einsum("...hd,hmd->...hm", x, weight.to(x.dtype))  # (..., H, m), in float32
        return torch.cat([torch.sin(u), torch.cos(u)], dim=-1) * self.feature_dim**-0.5  # (..., H, 2m)


@FEATURE_MAPS.register("performer")
class PerformerFeatureMap(_RandomFeatureMap):
    def __init__(
        self,
        num_heads: int,
        head_dim: int,
        feature_dim: int | None = None,
        *,
        seed: int = 0,
        redraw: bool = False,
    ):
        m = _positive_int("feature_dim", 64 if feature_dim is None else feature_dim)
        super().__init__(num_heads, head_dim, m, out_dim=m, seed=seed, redraw=redraw)
        self.reset_parameters()

    def options(self) -> dict[str, Any]:
        return {"seed": self.seed, "redraw": self.redraw}

    def draw(self, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
        """FAVOR+ rows: stacked Haar-orthogonal D x D blocks, each row rescaled to a chi(D) norm."""
        heads, m, d = self.num_heads, self.feature_dim, self.head_dim
        blocks = -(-m // d)  # ceil(m / d)
        gaussian = torch.randn(heads, blocks, d, d, generator=generator, device=device)  # (H, nb, D, D)
        q, r = torch.linalg.qr(gaussian)  # (H, nb, D, D) each
        q = q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1)).unsqueeze(-2)  # (H, nb, D, D), Haar
        rows = q.transpose(-1, -2).reshape(heads, blocks * d, d)[:, :m]  # (H, m, D), orthonormal rows
        norms = torch.randn(heads, m, d, generator=generator, device=device).norm(dim=-1)  # (H, m)
        return rows * norms.unsqueeze(-1)  # (H, m, D)

    def features(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        x = x * self.head_dim**-0.25  # (..., H, D)
        u = torch.einsum("...hd,hmd->...hm", x, weight.to(x.dtype))  # (..., H, m), in float32
        exponent = u - 0.5 * x.pow(2).sum(-1, keepdim=True)  # (..., H, m)
        return torch.exp(exponent.clamp(max=PERFORMER_MAX_EXPONENT)) * self.feature_dim**-0.5  # (..., H, m)
