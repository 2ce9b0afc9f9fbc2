"""Saving and loading converted models: safetensors + JSON only, written atomically, never unpickled."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import torch
from huggingface_hub.errors import StrictDataclassError
from safetensors import SafetensorError, safe_open
from transformers import AutoTokenizer

from .adapters import auto_class
from .errors import NotAT2RModelError, T2RError
from .io import private_dir_beside, recover_dir, refuse_symlink, replace_dir

log = logging.getLogger(__name__)


def save(model, out_dir: str | Path, tokenizer=None, *, overwrite: bool = False) -> Path:
    """Write `model` (and `tokenizer`) to `out_dir` via `save_pretrained`, atomically: into a temporary directory
    beside it, renamed into place only when complete. An existing directory is replaced only with `overwrite=True`
    and only if it holds a t2r model (nothing else a user made is ever deleted)."""
    out = Path(out_dir)
    refuse_symlink(out)
    recover_dir(out)
    if out.exists():
        if not overwrite:
            raise T2RError(f"{out} already exists: save to another directory, or replace it with overwrite=True "
                           "(on the command line: --overwrite)")
        if not (out.is_dir() and is_t2r_dir(out)):
            raise T2RError(f"{out} exists and is not a t2r model directory: refusing to replace it")
    for stale in out.parent.glob(f".{out.name}.*.partial"):  # left by a save that was killed
        shutil.rmtree(stale, ignore_errors=True)
    tmp = private_dir_beside(out)
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.debug("saved %s", out)  # the caller says where it saved (a staging folder is no news to a user)
    return out


def is_t2r_dir(path: Path) -> bool:
    try:
        return "t2r" in json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return False


def check_model_dir(path: str | Path) -> dict:
    """Validate a saved t2r model directory before loading it; returns its config dict.
    Raises NotAT2RModelError naming what is wrong (missing, not converted, damaged weights)."""
    p = Path(path)
    if recover_dir(p):
        log.warning("%s: put back the previous model, left aside by an interrupted save", p)
    if not p.is_dir():
        raise NotAT2RModelError(f"{str(path)!r} is not a directory: give the --out directory of `t2r convert`")
    config_file = p / "config.json"
    try:
        config = json.loads(config_file.read_text())
    except FileNotFoundError:
        raise NotAT2RModelError(f"{str(path)!r} has no config.json: not a saved model (make one with `t2r convert`)") from None
    except ValueError as err:
        raise NotAT2RModelError(f"{config_file} is not valid JSON ({err})") from None
    if "t2r" not in config:
        raise NotAT2RModelError(
            f"{str(path)!r} holds a plain {config.get('model_type', 'HF')} model, not a converted one: "
            f"run `t2r convert {path} --out DIR` first")
    try:
        check_weight_files(p)
    except T2RError as err:
        raise NotAT2RModelError(str(err)) from None
    return config


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


def pickle_how_to(path: Path) -> str:
    """How to turn a trusted pickled checkpoint into safetensors, once, outside t2r."""
    return (f"convert it once, only if you trust its source, with `python -c \"from transformers import "
            f"AutoModelForCausalLM as M; M.from_pretrained('{path}').save_pretrained('{path}-safetensors')\"` "
            "(save_pretrained writes safetensors) and give t2r the new directory")


def check_weight_files(path: str | Path) -> None:
    """A model directory's weights must be safetensors, complete and undamaged. Pickled weights (pytorch_model.bin,
    *.pt, ...) can run code when they are loaded: they are refused here, before any unpickler sees them."""
    p = Path(path)
    weights = sorted(p.glob("*.safetensors"))
    pickles = sorted(f.name for f in p.iterdir() if f.suffix in PICKLE_SUFFIXES and f.is_file())
    if not weights:
        if pickles:
            raise T2RError(f"{str(path)!r} has no .safetensors weights, only pickled ones ({', '.join(pickles)}), "
                           f"which can run code when loaded; t2r reads only safetensors: {pickle_how_to(p)}")
        raise T2RError(f"{str(path)!r} has no .safetensors weights")
    for file in weights:
        _check_safetensors(file)


def _check_safetensors(file: Path) -> None:
    """Read the header and check that every tensor's bytes are present (catches truncated or corrupt files)."""
    try:
        size = file.stat().st_size
        with open(file, "rb") as fh:
            header_len = int.from_bytes(fh.read(8), "little")
            if header_len <= 0 or 8 + header_len > size:
                raise ValueError("header length out of range")
            header = json.loads(fh.read(header_len))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        if 8 + header_len + end != size:
            raise ValueError(f"file has {size} bytes, its header describes {8 + header_len + end}")
        with safe_open(str(file), framework="pt") as f:
            f.keys()
    except (OSError, ValueError, KeyError, TypeError, SafetensorError) as err:
        raise NotAT2RModelError(f"{file} is damaged or truncated ({err}); convert or download it again") from None


def load(path: str | Path, dtype: torch.dtype = torch.float32):
    """Load a saved converted model (any supported family) from a directory; returns it in eval mode."""


    config = check_model_dir(path)
    try:
        model, info = auto_class(str(config.get("model_type", ""))).from_pretrained(
            str(path), dtype=dtype, use_safetensors=True, output_loading_info=True)
    except CONFIG_ERRORS as err:  # a config.json with wrong types or impossible values
        raise NotAT2RModelError(f"could not load {str(path)!r}: {' '.join(str(err).split())[:300]}") from err
    refuse_missing_weights(path, info)
    return model.eval()


# what building a model from a damaged config.json raises (a field of the wrong type, zero heads, a negative size)
CONFIG_ERRORS = (OSError, ValueError, KeyError, RuntimeError, TypeError, ArithmeticError, AttributeError,
                 StrictDataclassError)


def refuse_missing_weights(path, info: dict) -> None:
    """A model whose files lack weights its config.json asks for would start them from random values, silently:
    refuse it, naming one (a config that does not match its weights: edited, or from another model)."""
    missing = sorted(info.get("missing_keys") or ())
    if missing:
        raise NotAT2RModelError(f"{str(path)!r}: {len(missing)} weights its config.json needs are not in its files "
                                f"(e.g. {missing[0]}): the config does not match the weights; convert or download "
                                "the model again")


def load_tokenizer(path: str | Path):
    """The tokenizer saved beside a model, or None if there is none."""
    try:
        return AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError, KeyError):
        return None
