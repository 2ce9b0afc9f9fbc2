"""Mixers: how feature-mapped queries and keys combine with values into a layer's attention output, one registry entry
each, like the feature maps. A mixer owns its parameters (window mixing factors, gates) and calls its op in `t2r.ops`,
in the mode asked for (chunk | recurrent | quadratic), with key masks for padding and a fixed-size state.

    mixer = build_mixer(recipe, num_heads=H, scale=D ** -0.5, head_dim=D, feature_dim=F)
    o, state = mixer(q, k, v, phi_q, phi_k, key_mask=mask, state=None, mode="chunk", output_final_state=True)
    w = mixer.weights(scores, phi_q, phi_k, v=v)   # [B, H, T, T]: the quadratic twin, for attention transfer

===========  ==================================================================  ====================  ===============
name         the recurrence (state S [F, D] per head)                            parameters            state
===========  ==================================================================  ====================  ===============
linear       S_t = S_{t-1} + phi(k_t) v_t^T, o = phi(q)^T S / phi(q)^T z         none                  (S, z)
             (T2R, the paper)
window       the same over the keys older than `window`, beside a softmax over   window_logit [H]      (S, z) + window
             the last `window` keys, one shared normaliser (LoLCATs)                                   tokens
gla          S_t = diag(a_t) S_{t-1} + phi(k_t) v_t^T: a forget gate a_t in       gate (from v) [H,D,F]  (S, z)
             (0, 1)^F per head and token (GLA); optional window as above          (+ window_logit)      (+ window)
delta        S_t = (I - b_t k_t k_t^T) S_{t-1} + b_t k_t v_t^T on unit keys,      beta (from v) [H,D]   S
             o = S^T q: overwrites what its key held (DeltaNet); optional window   (+ window_logit)      (+ window)
gated_delta  the delta rule with a per-head decay a_t (Gated DeltaNet)            beta, gate [H,D]      S (+ window)
===========  ==================================================================  ====================  ===============

Gates read the token's value vector (the pretrained value projection of the layer input: no positions), start
constant (zero weights) and are trained in stage 1 with the feature maps. `t2r.ablation` switches parts off at
evaluation time: `linear` (the recurrence), `window`, `gate` (every decay 1).

A new mixer: subclass `Mixer`, implement `forward` and `weights`, decorate with `@MIXERS.register("name")`; recipes
then name it (`Recipe.mixer`) and its keyword options (`Recipe.mixer_options`). Parameters must live on the mixer:
stage 1 (attention transfer) trains every parameter under `.mixer.` with the feature maps.
"""

from __future__ import annotations

from ..ops import MODES
from .base import MIXERS, WINDOW_ONLY_LOGIT, HeadProjection, Mixer, build_mixer
from .delta import DeltaMixer, GatedDeltaMixer
from .gated import GatedLinearMixer
from .linear import LinearMixer, WindowMixer

__all__ = ["MIXERS", "MODES", "WINDOW_ONLY_LOGIT", "DeltaMixer", "GatedDeltaMixer", "GatedLinearMixer",
           "HeadProjection", "LinearMixer", "Mixer", "WindowMixer", "build_mixer"]
