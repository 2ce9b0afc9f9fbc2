"""One registry for everything t2r looks up by name: feature maps, mixers, model-family adapters.

    FEATURE_MAPS = Registry("feature map", FeatureMapError)

    @FEATURE_MAPS.register("hedgehog")
    class HedgehogFeatureMap(FeatureMap): ...

    FEATURE_MAPS.get("hedgehog")   # the class; an unknown name raises `error` listing the known ones
"""

from __future__ import annotations

from typing import Any, Callable


class Registry:
    """Name -> object table filled by a decorator; the decorator also sets ``obj.name`` to the first name."""

    def __init__(self, kind: str, error: type[Exception] = KeyError):
        self.kind = kind
        self.error = error
        self._entries: dict[str, Any] = {}

    def register(self, name: str, *aliases: str) -> Callable[[Any], Any]:
        """Decorator: register the object under `name` (and `aliases`); a name taken twice raises."""
        for key in (name, *aliases):
            if key in self._entries:
                raise self.error(f"{self.kind} '{key}' is already registered")

        def decorate(obj: Any) -> Any:
            obj.name = name
            for key in (name, *aliases):
                self._entries[key] = obj
            return obj

        return decorate

    def get(self, name: str) -> Any:
        if name not in self._entries:
            raise self.error(f"unknown {self.kind} '{name}'; known: {', '.join(self.names())}")
        return self._entries[name]

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def names(self) -> list[str]:
        return sorted(self._entries)

    def values(self) -> list[Any]:
        """Each registered object once, in registration order (an object with aliases is listed once)."""
        return list(dict.fromkeys(self._entries.values()))
