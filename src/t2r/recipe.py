"""The conversion recipe: what replaces softmax attention, stored in `model.config.t2r` so a saved model rebuilds
itself."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

from .errors import RecipeError

RECIPE_VERSION = 2  # 2: `mixer` and `mixer_options` (a version-1 recipe means mixer = window if window else linear)
INITS = ("pretrained", "random")  # where the weights of a model to convert come from (`t2r.convert.reinitialize`)


@dataclass(frozen=True)
class Recipe:
    """How to convert one model.

    feature_map: registered feature map name (see `t2r.feature_maps.FEATURE_MAPS`).
    feature_dim: the map's feature size (None: the map's own default).
    mixer: registered mixer name (see `t2r.mixers.MIXERS`): the recurrence, e.g. "linear" (plain causal linear
        attention), "window" (sliding softmax window + linear attention), "gla" (gated linear attention), "delta" or
        "gated_delta" (the delta rule). None: "window" if `window` else "linear".
    window: softmax window of the most recent `window` tokens beside the recurrent part (0: none); the "window"
        mixer needs one, "gla", "delta" and "gated_delta" take one optionally.
    keep_softmax_layers: layer indices that keep their original softmax attention.
    tie_qk: share one feature map between queries and keys (None: the map's own default).
    chunk_size: chunk length of the chunked parallel form used for training and prefill.
    eps: denominator guard of the linear attention normaliser.
    feature_map_options: extra keyword arguments of the feature map (e.g. {"seed": 0} for random features).
    mixer_options: extra keyword arguments of the mixer.
    """

    feature_map: str = "hedgehog"
    feature_dim: int | None = None
    window: int = 0
    keep_softmax_layers: tuple[int, ...] = ()
    tie_qk: bool | None = None
    chunk_size: int = 64
    eps: float = 1e-6
    feature_map_options: dict = field(default_factory=dict)
    mixer: str | None = None
    mixer_options: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "keep_softmax_layers", tuple(sorted({int(i) for i in self.keep_softmax_layers})))
        if self.mixer is None:
            object.__setattr__(self, "mixer", "window" if self.window else "linear")
        if self.feature_dim is not None and (not isinstance(self.feature_dim, int) or self.feature_dim <= 0):
            raise RecipeError(f"feature_dim must be a positive integer, got {self.feature_dim!r}")
        if not isinstance(self.window, int) or self.window < 0:
            raise RecipeError(f"window must be an integer >= 0 (0 = no softmax window), got {self.window!r}")
        if not isinstance(self.chunk_size, int) or self.chunk_size <= 0:
            raise RecipeError(f"chunk_size must be a positive integer, got {self.chunk_size!r}")
        if any(i < 0 for i in self.keep_softmax_layers):
            raise RecipeError(f"keep_softmax_layers must be layer indices >= 0, got {self.keep_softmax_layers}")
        if not self.eps > 0:
            raise RecipeError(f"eps must be > 0, got {self.eps!r}")
        from .mixers import MIXERS  # here: the command line builds recipes before it needs torch

        MIXERS.get(self.mixer).check_recipe(self)  # an unknown name raises with the known ones

    def check_layers(self, num_layers: int) -> None:
        """Raise if a kept softmax layer does not exist in a model of `num_layers` layers."""
        bad = [i for i in self.keep_softmax_layers if i >= num_layers]
        if bad:
            raise RecipeError(f"keep_softmax_layers {bad} out of range: the model has layers 0..{num_layers - 1}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["keep_softmax_layers"] = list(self.keep_softmax_layers)
        d["version"] = RECIPE_VERSION
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Recipe":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known - {"version"}
        if unknown:
            raise RecipeError(f"unknown recipe keys {sorted(unknown)}; known: {sorted(known)}")
        if d.get("version", RECIPE_VERSION) > RECIPE_VERSION:
            raise RecipeError(f"recipe version {d['version']} is newer than this t2r ({RECIPE_VERSION}): upgrade t2r")
        return cls(**{k: v for k, v in d.items() if k in known})
