"""Feature maps phi for linear attention ``out_t = phi(q_t)^T S_t / (phi(q_t)^T z_t + eps)``.

Every map is a small ``nn.Module`` registered by name in ``FEATURE_MAPS``; build one with
``build_feature_map(name, num_heads, head_dim, feature_dim=None, **options)``. ``forward(q, k)``
takes ``[B, T, H, D]`` tensors of any float dtype (any leading dims work) and returns
``(phi(q), phi(k))`` as ``[B, T, H, out_dim]`` float32. ``F`` below is ``feature_dim``.

=========  =========================================================  =============  ===========
name       phi(x), per head h                                         default F      out_dim
=========  =========================================================  =============  ===========
t2r        relu(W_h x + b_h)  -- T2R, Kasai et al. 2021                32             F
elu        elu(x) + 1  -- Katharopoulos et al. 2020                   D (fixed)      D
relu       relu(x)                                                    D (fixed)      D
rfa        x <- x/|x|;  sqrt(1/m) [sin(W_h x), cos(W_h x)],            m = 32         2m
           W ~ N(0, 1/sigma^2) fixed random -- RFA, Peng et al. 2021
performer  x <- x/D^(1/4);  exp(W_h x - |x|^2/2) / sqrt(m), W          m = 64         m
           orthogonal Gaussian rows -- FAVOR+, Choromanski et al. 2021
hedgehog   u = W_h x + b_h;  [softmax(u), softmax(-u)]                64             2F
           -- Hedgehog, Zhang et al. 2024 (as in LoLCATs)
taylor     x <- P_h x / F^(1/4);  [1, x, vec(x x^T)/sqrt(2)]           16             1 + F + F^2
           (so phi(q).phi(k) = 1 + s + s^2/2, s = Pq.Pk/sqrt(F))
           -- Based, Arora et al. 2024
=========  =========================================================  =============  ===========

State-dict keys: the learned maps (t2r, hedgehog, taylor's optional projection P) store the
tied-or-query weights as ``weight`` / ``bias`` and, when ``tie_qk=False``, the key weights as
``weight_k`` / ``bias_k`` (taylor has no bias). The random maps (rfa, performer) store their
matrix as the persistent buffer ``weight``. elu and relu have no state.

All parameters and buffers are float32 and all maps compute in float32. Construction works under
``with torch.device("meta"):``; ``reset_parameters()`` re-initialises a materialised module.
"""

from __future__ import annotations

import inspect
import math
from numbers import Integral, Real
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["FEATURE_MAPS", "FeatureMap", "FeatureMapError", "Registry", "build_feature_map"]

PERFORMER_MAX_EXPONENT = 30.0  # exp(30) ~ 1e13: finite in float32, even summed over long sequences
RFA_NORM_EPS = 1e-6


class FeatureMapError(ValueError):
    """A feature map was asked for with bad arguments; the message says what to change."""


class Registry:
    """Name -> object table filled by a decorator; the decorator also sets ``obj.name = name``."""

    def __init__(self, kind: str, error: type[Exception] = FeatureMapError):
        self.kind = kind
        self.error = error
        self._entries: dict[str, Any] = {}

    def register(self, name: str) -> Callable[[Any], Any]:
        if name in self._entries:
            raise self.error(f"{self.kind} '{name}' is already registered")

        def decorate(obj: Any) -> Any:
            obj.name = name
            self._entries[name] = obj
            return obj

        return decorate

    def get(self, name: str) -> Any:
        if name not in self._entries:
            raise self.error(f"unknown {self.kind} '{name}'; known: {', '.join(self.names())}")
        return self._entries[name]

    def names(self) -> list[str]:
        return sorted(self._entries)


FEATURE_MAPS = Registry("feature map")

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
    u = torch.einsum("...hd,hfd->...hf", x, weight)  # (..., H, F)
    return u if bias is None else u + bias  # (..., H, F)


class FeatureMap(nn.Module):
    """Base class: validates sizes and inputs, casts to float32, applies ``phi`` to q and k."""

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


class _ElementwiseMap(FeatureMap):
    """No parameters; out_dim = feature_dim = head_dim."""

    def __init__(self, num_heads: int, head_dim: int, feature_dim: int | None = None):
        if feature_dim is not None and _positive_int("feature_dim", feature_dim) != head_dim:
            raise FeatureMapError(
                f"feature map '{self.name}' has out_dim = head_dim = {head_dim}; "
                f"pass feature_dim=None or {head_dim}, got {feature_dim!r}"
            )
        super().__init__(num_heads, head_dim, head_dim, out_dim=head_dim)


@FEATURE_MAPS.register("elu")
class EluFeatureMap(_ElementwiseMap):
    def phi(self, x: torch.Tensor, is_key: bool) -> torch.Tensor:
        return F.elu(x) + 1.0  # (..., H, D)


@FEATURE_MAPS.register("relu")
class ReluFeatureMap(_ElementwiseMap):
    def phi(self, x: torch.Tensor, is_key: bool) -> torch.Tensor:
        return F.relu(x)  # (..., H, D)


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
        u = torch.einsum("...hd,hmd->...hm", x, weight)  # (..., H, m)
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
        u = torch.einsum("...hd,hmd->...hm", x, weight)  # (..., H, m)
        exponent = u - 0.5 * x.pow(2).sum(-1, keepdim=True)  # (..., H, m)
        return torch.exp(exponent.clamp(max=PERFORMER_MAX_EXPONENT)) * self.feature_dim**-0.5  # (..., H, m)
