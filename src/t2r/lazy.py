"""Packages whose public names are imported on first use (PEP 562), so that importing a package, and `t2r --help`,
does not import torch or transformers."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable


def lazy_exports(package: str, exports: dict[str, str], submodules: tuple[str, ...] = ()) -> Callable[[str], object]:
    """The module-level `__getattr__` of `package`: `exports` maps a public name to the module that defines it,
    relative as in an import statement (`{"TrainConfig": ".config", "seeded": "..rng"}`); `submodules` are imported
    when used as attributes (`t2r.ops`)."""

    def __getattr__(name: str):
        if name in exports:
            value = getattr(importlib.import_module(exports[name], package), name)
        elif name in submodules:
            value = importlib.import_module(f".{name}", package)
        else:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        setattr(sys.modules[package], name, value)
        return value

    return __getattr__
