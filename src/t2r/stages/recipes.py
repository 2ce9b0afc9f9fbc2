"""Pipeline recipes: a YAML file (src/t2r/recipes/*.yaml ship with t2r and are usable by name) read into one typed
model, `PipelineRecipe`, whose parts are the settings models the commands use (`ConvertSettings` as `t2r convert`'s
flags, `DistillSettings` as `t2r distill`'s, `FinetuneSettings` as `t2r finetune`'s), with the same defaults:

    name: hedgehog-window           # run name (OUT defaults to runs/<name>)
    model: null                     # GGUF file, HF directory or hub id (null: the embedded SmolLM2-135M-Instruct)
    init: pretrained                # or random: the same RNN from random weights (the paper's baseline)
    data: austen                    # training text (anything `t2r data` takes)
    block_size: 512
    convert: {feature_map: hedgehog, feature_dim: 64, window: 64, keep_softmax_layers: []}
    distill: {tokens: 100k, lr: 0.03}              # stage 1; omit to skip
    keep_softmax: auto:3            # after stage 1, the 3 layers with the highest transfer error go back to softmax
    teacher_finetune: {tokens: 150k, lora: 8}      # optional: the original finetuned on the same data (LM loss)
    finetune: {tokens: 100k, lora: 8, kd: 0.5}     # stage 2; omit to skip
    eval: {data: [austen, pydocs], context: 512, max_blocks: 16}
    generate: {prompt: "It is a truth universally acknowledged", max_new_tokens: 32}

Any value can be overridden on the command line as a dotted key, its value read as YAML (`t2r pipeline --config demo
--distill.tokens 4k --eval.max_blocks 2`). An unknown key or a bad value, in the file or on the command line, is one
line naming the key and the file (`RecipeFileError`).
"""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import BeforeValidator, Field, ValidationError, field_validator, model_serializer, model_validator

from ..errors import T2RError
from ..recipe import INITS, Recipe
from ..settings import Settings, SettingsError, describe_errors, dotted
from ..train.settings import DistillSettings, FinetuneSettings

DEFAULT_PROMPT = "It is a truth universally acknowledged"


class RecipeFileError(SettingsError):
    """A pipeline recipe that cannot be read, or has an unknown key or a bad value (the message names it)."""


def _layer_list(value: Any) -> Any:
    """"0,15" (the command line) or [0, 15] (YAML) -> [0, 15]."""
    if value is None or value == "":
        return []
    if isinstance(value, int) and not isinstance(value, bool):
        return [value]
    if isinstance(value, str):
        try:
            return [int(x) for x in value.replace(" ", "").split(",") if x]
        except ValueError:
            raise ValueError(f"takes comma-separated layer indices like 0,15; got {value!r}") from None
    return value


def _mapping(value: Any) -> Any:
    """A mapping, or its YAML text from the command line ('{seed: 1}')."""
    if isinstance(value, str):
        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError:
            raise ValueError(f"takes a mapping like '{{seed: 1}}', got {value!r}") from None
    return {} if value is None else value


def _layer_choice(value: Any) -> Any:
    """"all", "global", or layer indices ("5,11" on the command line, [5, 11] in YAML) -> their text form."""
    if value in ("all", "global"):
        return value
    try:
        indices = _layer_list(value)
    except ValueError:
        indices = None
    if not indices or not all(isinstance(i, int) and i >= 0 for i in indices):
        raise ValueError(f"takes all, global or layer indices like 5,11; got {value!r}")
    return ",".join(str(i) for i in sorted(set(indices)))


Layers = Annotated[list[int], BeforeValidator(_layer_list)]
LayerChoice = Annotated[str, BeforeValidator(_layer_choice)]
Options = Annotated[dict[str, Any], BeforeValidator(_mapping)]


class ConvertSettings(Settings):
    """How to convert (`t2r convert`, a recipe's `convert:`): the fields of `t2r.recipe.Recipe`, and the seed."""

    feature_map: str = Field("hedgehog", description="feature map name: elu, hedgehog, performer, relu, rfa, t2r, "
                                                     "taylor.")
    feature_dim: int | None = Field(None, description="feature size of the map (default: the map's own, e.g. 64 for "
                                                      "hedgehog, head_dim for elu).")
    window: int = Field(0, description="sliding softmax window of this many recent tokens beside the linear part "
                                       "(0: pure linear).")
    keep_softmax_layers: Layers = Field("", description="comma-separated layer indices that keep softmax attention, "
                                                        "e.g. 0,15.")
    tie_qk: bool | None = Field(None, description="share one feature map between queries and keys (default: the "
                                                  "map's own choice).")
    chunk_size: int = Field(64, description="chunk length of the chunked form used in training and prefill.")
    eps: float = Field(1e-6, description="denominator guard of the linear attention normaliser.")
    feature_map_options: Options = Field("", description="extra options of the feature map, as YAML, e.g. "
                                                         "'{seed: 1}'.")
    mixer: str | None = Field(None, description="the recurrence: linear, window (linear + softmax window), gla "
                                                "(gated), delta or gated_delta (default: window if --window > 0, "
                                                "else linear); gla, delta and gated_delta take a --window too.")
    mixer_options: Options = Field("", description="extra options of the mixer, as YAML, e.g. '{decay_init: 0.999}' "
                                                   "(gla, gated_delta) or '{beta_init: 0.5}' (delta, gated_delta).")
    seed: int = Field(0, description="seed for the new feature-map weights (and for --init random).")
    convert_layers: LayerChoice = Field("all", description="the layers to convert: all, global (those whose own "
                                                           "attention does not slide, e.g. Gemma 3's global layers; "
                                                           "the local ones keep their sliding-window softmax) or "
                                                           "indices like 5,11.")

    @model_validator(mode="after")
    def _valid(self) -> ConvertSettings:
        from ..feature_maps import FEATURE_MAPS  # here: `t2r --help` shows these settings without importing torch

        try:
            FEATURE_MAPS.get(self.feature_map)
            self.recipe()
        except T2RError as err:
            raise ValueError(str(err)) from None
        return self

    @model_serializer(mode="wrap")
    def _dump(self, handler) -> dict:
        """`convert_layers` is left out while it is "all" (its default), so that the stages recorded before it
        existed still equal a recipe's settings."""
        data = handler(self)
        if data.get("convert_layers") == "all":
            data.pop("convert_layers")
        return data

    def recipe(self) -> Recipe:
        """The conversion recipe (its fields that this t2r's `Recipe` has; `mixer` only when set)."""
        known = {f.name for f in fields(Recipe)}
        values = {k: v for k, v in self.model_dump().items() if k in known and not (k == "mixer" and v is None)}
        return Recipe(**{**values, "keep_softmax_layers": tuple(values["keep_softmax_layers"])})


def parse_keep_softmax(spec, num_layers: int) -> tuple[str, int | list[int]]:
    """"auto:3" -> ("auto", 3); [0, 15] or "0,15" -> ("fixed", [0, 15])."""
    if spec is None or spec == "" or spec == []:
        return "fixed", []
    if isinstance(spec, str) and spec.startswith("auto:"):
        n = int(spec[5:]) if spec[5:].isdigit() else -1
        if not 0 <= n < num_layers:
            raise RecipeFileError(f"keep_softmax 'auto:N' needs 0 <= N < {num_layers} layers, got {spec!r}")
        return "auto", n
    items = spec.split(",") if isinstance(spec, str) else spec
    try:
        return "fixed", sorted({int(i) for i in items})
    except (TypeError, ValueError):
        raise RecipeFileError(f"keep_softmax takes 'auto:N' or layer indices like [0, 15]; got {spec!r}") from None


def _keep_softmax(value: Any) -> Any:
    """None, "auto:N" or a sorted list of layer indices (whether they exist is checked on the model)."""
    if isinstance(value, str) and value.startswith("auto:"):
        if not value[5:].isdigit():
            raise ValueError(f"'auto:N' takes a number of layers N >= 0, got {value!r}")
        return f"auto:{int(value[5:])}"
    try:
        return parse_keep_softmax(value, 0)[1] or None
    except RecipeFileError as err:
        raise ValueError(str(err).removeprefix("keep_softmax ")) from None


class EvalSettings(Settings):
    """The held-out evaluation after every stage (a recipe's `eval:`)."""

    data: Annotated[list[str], BeforeValidator(lambda v: [v] if isinstance(v, str) else v)] = ["austen"]
    context: int | None = Field(None, gt=1, description="tokens per evaluation window (default: the block size).")
    max_blocks: int | None = Field(16, gt=0, description="held-out blocks per set (null: all).")
    batch_size: int = Field(2, gt=0)


class GenerateSettings(Settings):
    """The generation and decode-speed check at the end (a recipe's `generate:`)."""

    prompt: str = DEFAULT_PROMPT
    max_new_tokens: int = Field(32, gt=0)


class PipelineRecipe(Settings):
    """A pipeline recipe (see the module docstring)."""

    name: str
    model: str | None = None
    init: str = "pretrained"
    data: str = "austen"
    block_size: int = Field(512, gt=1)
    convert: ConvertSettings = Field(default_factory=ConvertSettings)  # made when used: checking it imports torch
    distill: DistillSettings | None = None
    keep_softmax: Annotated[str | list[int] | None, BeforeValidator(_keep_softmax)] = None
    teacher_finetune: FinetuneSettings | None = None
    finetune: FinetuneSettings | None = None
    eval: EvalSettings = EvalSettings()
    generate: GenerateSettings = GenerateSettings()

    @field_validator("init")
    @classmethod
    def _init(cls, value: str) -> str:
        if value not in INITS:
            raise ValueError(f"must be one of {', '.join(INITS)}, got {value!r}")
        return value

    @field_validator("teacher_finetune")
    @classmethod
    def _lm_loss_only(cls, value: FinetuneSettings | None) -> FinetuneSettings | None:
        if value is not None and value.kd:
            raise ValueError("kd is not a setting here: the original is finetuned on the LM loss alone")
        return value

    @classmethod
    def from_file(cls, path: str | Path, overrides: dict[str, str] | None = None) -> PipelineRecipe:
        """Read a YAML recipe: a file path, or the name of a recipe shipped with t2r (see `shipped_recipes()`), with
        `overrides` ({"distill.tokens": "4k"}: dotted keys, values read as YAML) applied on top."""
        return read_recipe(path, overrides)


def shipped_recipes() -> dict[str, Path]:
    """The recipes that ship with t2r (src/t2r/recipes/*.yaml), by name."""
    return {p.stem: p for p in sorted((Path(__file__).parents[1] / "recipes").glob("*.yaml"))}


def _one_line(err: Exception) -> str:
    return " ".join(str(err).split())


def _load_yaml(spec: str | Path) -> tuple[dict, str]:
    """The mapping in a recipe file and how to name the file in messages."""
    path, where = Path(spec), str(spec)
    if not path.exists() and where in shipped_recipes():
        path, where = shipped_recipes()[where], f"{where}.yaml"
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise RecipeFileError(f"recipe file {where!r} does not exist; shipped recipes: "
                              f"{', '.join(shipped_recipes())}") from None
    except yaml.YAMLError as err:
        raise RecipeFileError(f"recipe {where}: not valid YAML: {_one_line(err)}") from None
    if not isinstance(raw, dict):
        raise RecipeFileError(f"recipe {where}: must be a mapping of settings, got {type(raw).__name__}")
    raw.setdefault("name", path.stem)
    return raw, where


def apply_overrides(raw: dict, overrides: dict[str, str], where: str) -> None:
    """Set each dotted key of `overrides` in the mapping `raw` (a missing or null section becomes a mapping)."""
    for key, text in overrides.items():
        *sections, last = key.replace("-", "_").split(".")
        node = raw
        for section in sections:
            if node.get(section) is None:
                node[section] = {}
            if not isinstance(node[section], dict):
                raise RecipeFileError(f"recipe {where}: --{key} (command line): {section} is not a section, it is "
                                      f"{node[section]!r}")
            node = node[section]
        try:
            node[last] = yaml.safe_load(text) if text.strip() else text
        except yaml.YAMLError as err:
            raise RecipeFileError(f"recipe {where}: --{key} (command line): not a YAML value: {_one_line(err)}") \
                from None


def read_recipe(spec: str | Path, overrides: dict[str, str] | None = None) -> PipelineRecipe:
    """A recipe file (or shipped recipe name) with command-line `overrides` applied; errors in one line naming the
    key (marked when it came from the command line) and the file."""
    raw, where = _load_yaml(spec)
    given = {key.replace("-", "_") for key in overrides or {}}
    apply_overrides(raw, overrides or {}, where)

    def name(path: list) -> str:
        key = dotted(path)
        return f"--{key} (command line)" if key in given else key

    try:
        return PipelineRecipe.model_validate(raw)
    except ValidationError as err:
        raise RecipeFileError(f"recipe {where}: {describe_errors(err, PipelineRecipe, name)}") from None
