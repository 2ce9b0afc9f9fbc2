"""Stage deltas: a pipeline stage saved as what it changed over the stage it was built on.

A delta stage directory holds what a full one holds (config.json, generation config, tokenizer, the stage's records)
except the weights: `delta.safetensors` has only the tensors that differ from the parent stage (attention transfer:
the feature maps and window factors; LoRA finetuning: the merged projections and the maps), and `delta.json` names

    {"format": "t2r-stage-delta/1", "parent": "../converted", "parent_fingerprint": "<sha256>",
     "tensors": [the names in delta.safetensors], "removed": [parent tensors the stage does not have]}

`removed` lists what a stage dropped (a layer that went back to softmax loses its feature map). Loading a delta
(`t2r.load`, every command given a stage directory, or `AutoModelForCausalLM.from_pretrained` after `import t2r`:
the converted classes' `from_pretrained` in `t2r.adapters.classes` calls `materialise`) reads the parent's tensors
(recursively: a chain such as finetune -> distill -> converted), drops `removed`, puts the stage's own tensors over
them, and builds the model from that. The parent's fingerprint (sha256 of its weight files and, for a delta, of its
own parent's fingerprint) is checked first: a parent changed or deleted since is one line saying to redo the stage.
The chain's root is a whole stage directory or, for the converted stage, the source model itself (`"source"` instead
of `"parent"`): `t2r.stages.source_root` rebuilds that one (bit for bit, or refuses) and registers itself here as
`ROOTS["source"]` when t2r registers its classes with transformers. This module is part of the remote-code bundle
of `t2r.adapters.classes`, which may import only torch, transformers and safetensors: it cannot import the source
loader itself. Everything read is safetensors (and the source, as `t2r.sources.load_model` reads it).
A directory is turned into a delta in place (`rewrite_as_delta`, `source_root.rewrite_over_source`) in steps that
each leave a loadable model: delta.json first (the full weights, still there, overlay the parent with the same
values), then delta.safetensors (written atomically), then the full weight files are removed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from ..errors import NotAT2RModelError
from ..io import atomic_write, write_json
from ..units import fmt_bytes

log = logging.getLogger(__name__)

DELTA = "delta.json"
WEIGHTS = "delta.safetensors"
FORMAT = "t2r-stage-delta/1"
MAX_CHAIN = 16  # stages in one chain (a loop of parents is refused, not followed forever)
# what a chain's root delta may name instead of a parent -> fn(stage_dir, its entry) -> the tensors it takes from it
ROOTS: dict[str, Callable[[Path, dict], dict[str, torch.Tensor]]] = {}


class StageParentError(NotAT2RModelError):
    """A delta stage whose parent stage is missing or no longer the one it was saved against."""


def is_delta_dir(path: str | Path) -> bool:
    return (Path(path) / DELTA).is_file()


def read_delta(path: str | Path) -> dict:
    try:
        meta = json.loads((Path(path) / DELTA).read_text())
    except (OSError, ValueError) as err:
        raise NotAT2RModelError(f"{Path(path) / DELTA} cannot be read ({err}): redo the stage") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or not (
            isinstance(meta.get("parent"), str) or isinstance(meta.get("source"), dict)):
        raise NotAT2RModelError(f"{Path(path) / DELTA} is not a {FORMAT} file: redo the stage")
    return meta


def weight_files(path: str | Path) -> list[Path]:
    return sorted(Path(path).glob("*.safetensors"))


def hash_files(files: list[Path], h=None):
    """`h` (a new sha256 if None) updated with each file's name and bytes, read in 16 MiB pieces."""
    h = h or hashlib.sha256()
    for file in files:
        h.update(file.name.encode())
        with open(file, "rb") as fh:
            while chunk := fh.read(1 << 24):
                h.update(chunk)
    return h


def fingerprint(path: str | Path) -> str:
    """sha256 of a model directory's weights: its safetensors files (names and bytes) and, for a delta, its parent's
    recorded fingerprint, or its source's (so a chain is identified by its root's bytes and every delta's)."""
    h = hashlib.sha256()
    if is_delta_dir(path):
        meta = read_delta(path)
        source = meta.get("source")
        key = source["fingerprint"] + source["base_fingerprint"] if source else meta["parent_fingerprint"]
        h.update(key.encode())
    return hash_files(weight_files(path), h).hexdigest()


def parent_of(path: str | Path) -> Path:
    """The parent stage directory of the delta at `path`, checked to be the one the delta was saved against."""
    path = Path(path)
    meta = read_delta(path)
    parent = (path / meta["parent"]).resolve()
    redo = (f"redo the stage (`t2r pipeline ... --redo {path.name}`), or put the parent back; a pipeline's final "
            "model is saved whole and does not need it")
    if not parent.is_dir():
        raise StageParentError(f"{path} is saved as changes over {meta['parent']} ({parent}), which is gone: {redo}")
    if fingerprint(parent) != meta.get("parent_fingerprint"):
        raise StageParentError(f"{path} is saved as changes over {parent}, whose weights have changed since: {redo}")
    return parent


def _read_files(path: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in weight_files(path):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                tensors[name] = f.get_tensor(name)
    return tensors


def materialise(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of the model saved at `path` (a full directory, or a delta over a chain of parents, whose root is
    a full directory or the source model)."""
    chain, current, tensors = [], Path(path), None
    while is_delta_dir(current):
        chain.append(current)
        if len(chain) > MAX_CHAIN:
            raise NotAT2RModelError(f"{path}: more than {MAX_CHAIN} stages in its chain of parents (a loop?): "
                                    "redo the stage")
        source = read_delta(current).get("source")
        if source is not None:
            if "source" not in ROOTS:
                raise NotAT2RModelError(f"{current} is saved as changes over its source model: load it with t2r "
                                        "(`t2r.load`, or transformers after `import t2r`)")
            tensors = ROOTS["source"](current, source)
            break
        current = parent_of(current)
    if tensors is None:
        tensors = _read_files(current)
    for stage in reversed(chain):
        for name in read_delta(stage).get("removed", []):
            tensors.pop(name, None)
        tensors.update(_read_files(stage))
    return tensors


def _header(file: Path) -> dict:
    with open(file, "rb") as fh:
        header = json.loads(fh.read(int.from_bytes(fh.read(8), "little")))
    header.pop("__metadata__", None)
    return header


def whole_weight_bytes(path: str | Path) -> int:
    """Bytes of tensor data the model at `path` holds once materialised (its weight files' sizes, less their headers,
    for a full directory); read from the safetensors headers of the chain, no tensor is loaded."""
    chain, current, sizes = [], Path(path), {}
    while is_delta_dir(current) and len(chain) <= MAX_CHAIN:
        chain.append(current)
        meta = read_delta(current)
        if "source" in meta:
            sizes, current = dict(meta["source"]["bytes"]), None
            break
        current = (current / meta["parent"]).resolve()
    for stage in ([current] if current is not None else []) + chain[::-1]:
        for name in read_delta(stage).get("removed", []) if stage is not current else []:
            sizes.pop(name, None)
        for file in weight_files(stage):
            sizes.update({k: v["data_offsets"][1] - v["data_offsets"][0] for k, v in _header(file).items()})
    return sum(sizes.values())


def materialise_in_place(stage_dir: str | Path) -> None:
    """Turn the delta at `stage_dir` into a whole, standalone model directory (model.safetensors, no delta.json),
    in steps that each leave a directory loading to the same model."""
    stage_dir = Path(stage_dir)
    tensors = materialise(stage_dir)
    atomic_write(stage_dir / "model.safetensors", lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    (stage_dir / DELTA).unlink()
    (stage_dir / WEIGHTS).unlink(missing_ok=True)
    log.info("%s: saved whole (standalone)", stage_dir.name)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


def rewrite_as_delta(stage_dir: str | Path, parent_dir: str | Path) -> dict:
    """Replace the full weights saved in `stage_dir` by the tensors that differ from `parent_dir`'s (a full or delta
    stage); returns {"tensors", "removed", "bytes"}. Every step leaves a directory that loads to the same model."""
    stage_dir, parent_dir = Path(stage_dir), Path(parent_dir)
    return rewrite(stage_dir, materialise(parent_dir), parent_dir.name, lambda own, changed: {
        "parent": os.path.relpath(parent_dir.resolve(), stage_dir.resolve()),
        "parent_fingerprint": fingerprint(parent_dir)})


def rewrite(stage_dir: Path, parent: dict[str, torch.Tensor], parent_name: str, reference) -> dict:
    """`stage_dir` rewritten as its tensors that differ from `parent`, with `reference(own, changed)` (what names the
    parent) in its delta.json."""
    if is_delta_dir(stage_dir):
        raise NotAT2RModelError(f"{stage_dir} is already saved as a delta")
    own = _read_files(stage_dir)
    changed = {name: t.contiguous() for name, t in own.items() if name not in parent or not _same(t, parent[name])}
    meta = {"format": FORMAT, **reference(own, changed), "tensors": sorted(changed),
            "removed": sorted(set(parent) - set(own))}
    full = weight_files(stage_dir) + sorted(stage_dir.glob("*.safetensors.index.json"))
    write_json(stage_dir / DELTA, meta)
    atomic_write(stage_dir / WEIGHTS, lambda tmp: save_file(changed, tmp, metadata={"format": "pt"}))
    for file in full:
        if file.name != WEIGHTS:
            file.unlink()
    size = (stage_dir / WEIGHTS).stat().st_size
    log.info("%s: saved as its %d changed tensors over %s (%s)", stage_dir.name, len(changed), parent_name,
             fmt_bytes(size))
    return {"tensors": len(changed), "removed": len(meta["removed"]), "bytes": size}
