"""t2r: turn a pretrained transformer language model into an RNN.

    import t2r
    model = t2r.convert(model, feature_map="hedgehog", feature_dim=64)   # same HF model, linear attention
    t2r.save(model, "runs/rnn", tokenizer)
    model = t2r.load("runs/rnn")            # or AutoModelForCausalLM.from_pretrained("runs/rnn") after `import t2r`
"""

from . import adapters, ops  # noqa: F401  (adapters registers the converted model classes)
from .adapters import RecurrentCache, cache_bytes, supported_model_types
from .convert import convert, keep_softmax
from .decode import decode
from .errors import T2RError
from .feature_maps import FEATURE_MAPS, build_feature_map
from .generate import Sampling, generate, new_cache
from .mixers import MIXERS
from .persistence import load, save
from .recipe import Recipe
from .verify import verify

__version__ = "0.1.0"

__all__ = [
    "FEATURE_MAPS", "MIXERS", "RecurrentCache", "Recipe", "Sampling", "T2RError", "build_feature_map", "cache_bytes",
    "convert", "decode", "generate", "keep_softmax", "load", "new_cache", "ops", "save", "supported_model_types",
    "verify",
]
