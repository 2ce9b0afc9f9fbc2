"""Maps without parameters: ELU+1 (Katharopoulos et al. 2020) and ReLU; out_dim = head_dim."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import FEATURE_MAPS, FeatureMap, FeatureMapError, _positive_int


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
