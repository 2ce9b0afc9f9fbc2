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

from ..registry import Registry
from . import elementwise, learned, random_features  # noqa: F401  (each registers its maps)
from .base import FEATURE_MAPS, FeatureMap, FeatureMapError, build_feature_map

__all__ = ["FEATURE_MAPS", "FeatureMap", "FeatureMapError", "Registry", "build_feature_map"]
