"""Linear attention ops (pure torch): one signature per op, a slow quadratic twin for every fast path.

linear_attention                  causal / non-causal linear attention (chunk | recurrent | quadratic)
linear_attention_terms            the same, unnormalised: (num, den, state)
sliding_window_linear_attention   softmax over the last `window` keys + linear attention over older ones
delta_rule                        the (gated) delta rule, DeltaNet / Gated DeltaNet (chunk | recurrent | quadratic)
delta_rule_weights                its [B, H, T, T] weights from a zero state: o = A v (attention transfer)
sliding_window_delta_rule         softmax over the last `window` keys + a delta-rule memory of older ones
gated_linear_attention            linear attention with per-step (per-feature or per-head) decays, GLA
gated_linear_attention_terms      the same, unnormalised: (num, den, state)
gated_linear_attention_weights    its [B, H, T, T] unnormalised weights from a zero state (attention transfer)
LinearState, WindowState          the fixed-size recurrent states (NamedTuples)
DeltaState, DeltaWindowState      the same for the delta rule and its window hybrid
"""

from .common import MODES, DeltaState, DeltaWindowState, LinearState, WindowState, guard
from .delta import delta_rule, delta_rule_weights, sliding_window_delta_rule
from .gla import gated_linear_attention, gated_linear_attention_terms, gated_linear_attention_weights
from .linear import linear_attention, linear_attention_terms
from .window import sliding_window_linear_attention

__all__ = [
    "MODES",
    "DeltaState",
    "DeltaWindowState",
    "LinearState",
    "WindowState",
    "delta_rule",
    "delta_rule_weights",
    "gated_linear_attention",
    "gated_linear_attention_terms",
    "gated_linear_attention_weights",
    "guard",
    "linear_attention",
    "linear_attention_terms",
    "sliding_window_delta_rule",
    "sliding_window_linear_attention",
]
