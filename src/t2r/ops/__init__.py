"""Linear attention ops (pure torch): one signature per op, a slow quadratic twin for every fast path.

linear_attention                  causal / non-causal linear attention (chunk | recurrent | quadratic)
linear_attention_terms            the same, unnormalised: (num, den, state)
sliding_window_linear_attention   softmax over the last `window` keys + linear attention over older ones
LinearState, WindowState          the fixed-size recurrent states (NamedTuples)
"""

from .common import MODES, LinearState, WindowState, guard
from .linear import linear_attention, linear_attention_terms
from .window import sliding_window_linear_attention

__all__ = [
    "MODES",
    "LinearState",
    "WindowState",
    "guard",
    "linear_attention",
    "linear_attention_terms",
    "sliding_window_linear_attention",
]
