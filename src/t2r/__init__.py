"""t2r: turn a pretrained transformer language model into an RNN.

    import t2r
    model = t2r.convert(model, feature_map="hedgehog", feature_dim=64)   # same HF model, linear attention
    t2r.save(model, "runs/rnn", tokenizer)
    model = t2r.load("runs/rnn")            # or AutoModelForCausalLM.from_pretrained("runs/rnn") after `import t2r`

`import t2r` is light (no torch): each name below is imported the first time it is used, so `t2r --help` answers at
once. The converted model classes are registered with transformers' `Auto*` factories as soon as transformers is
imported (now, if it already is), so `AutoModelForCausalLM.from_pretrained` works after `import t2r` as before.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import types

from .lazy import lazy_exports

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    **dict.fromkeys(["FEATURE_MAPS", "build_feature_map"], ".feature_maps"), "MIXERS": ".mixers",
    **dict.fromkeys(["RecurrentCache", "cache_bytes", "supported_model_types"], ".adapters"),
    "drop_dequantized_quantizer": ".adapters.base", "Chat": ".chat",
    **dict.fromkeys(["convert", "keep_softmax"], ".convert"),
    "decode": ".decode", "T2RError": ".errors", **dict.fromkeys(["Sampling", "generate", "new_cache"], ".generate"),
    **dict.fromkeys(["load", "save"], ".persistence"), "Recipe": ".recipe", "verify": ".verify",
}
_NAMED_LIKE_THEIR_MODULE = {name for name, module in _EXPORTS.items() if module == f".{name}"}

__getattr__ = lazy_exports(__name__, _EXPORTS, submodules=("adapters", "ops"))
__all__ = sorted([*_EXPORTS, "ops"])


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


class _Package(types.ModuleType):
    """`t2r.convert` (likewise decode, generate, verify) stays the function whichever is imported first: importing
    the submodule of the same name does not replace it (as with the eager imports this package used to do)."""

    def __setattr__(self, name: str, value) -> None:
        if name in _NAMED_LIKE_THEIR_MODULE and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def register_with_transformers() -> None:
    """Register the converted model classes (`t2r_llama`, `t2r_gpt2`, ...) with transformers' Auto* factories.
    Happens by itself when transformers is imported; calling it again does nothing."""
    importlib.import_module(".adapters", __name__)
    importlib.import_module(".stages.source_root", __name__)  # a stage saved over its source model loads too


class _AfterTransformers(importlib.abc.Loader):
    """Transformers' own loader, then `register_with_transformers()`."""

    def __init__(self, loader) -> None:
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        self.loader.exec_module(module)
        register_with_transformers()

    def __getattr__(self, name: str):  # resources, source, ... as the real loader answers them
        return getattr(self.loader, name)


class _WatchTransformers(importlib.abc.MetaPathFinder):
    """Finds transformers like everyone else, and registers t2r's classes once it has been imported."""

    def find_spec(self, fullname: str, path=None, target=None):
        if fullname != "transformers":
            return None
        sys.meta_path.remove(self)  # once; the other finders find the real module
        spec = importlib.util.find_spec(fullname)
        if spec is not None and spec.loader is not None:
            spec.loader = _AfterTransformers(spec.loader)
        return spec


if "transformers" in sys.modules:
    register_with_transformers()
elif not any(isinstance(finder, _WatchTransformers) for finder in sys.meta_path):
    sys.meta_path.insert(0, _WatchTransformers())
