"""The root of a pipeline's chain of stage deltas: the converted stage saved as its changes over the SOURCE model (the
GGUF file or HF directory the recipe names), not over another stage.

Its `delta.json` has a `source` entry instead of a `parent`:

    {"spec": "smollm2", "kind": "gguf", "path": "/abs/SmolLM2-135M-Instruct.Q4_1.gguf",
     "fingerprint": "<sha256 of the source's files>", "base_fingerprint": "<sha256 of the tensors taken from it>",
     "bytes": {name: bytes of each tensor taken from the source}}

Materialising it loads the source as the pipeline did (`t2r.sources.load_model`, float32; a GGUF file is
dequantized), keeps the tensors the stage did not change, and the stage's own tensors (feature maps, window factors,
mixer parameters) come from `delta.safetensors`; the model is then built from the stage's config.json (its recipe),
so nothing is drawn from an RNG. Two checks make the rebuild bit-identical or refused: the source's files are hashed
before it loads (a changed or missing file: one line saying to redo the stage or restore the source), and the tensors
taken from it are hashed after (a loader that dequantizes differently, e.g. another transformers or gguf release,
is refused the same way instead of giving a slightly different model).

Not every source can be a root: a hub id names a revision that can move and may need the network to load again, and a
recipe with `init: random` replaces the source's weights by random draws (a delta would hold every tensor): such a
converted stage stays whole (`source_reference` returns None for a hub id; the pipeline skips `init: random`).

Importing this module registers `source_tensors` as `t2r.stages.delta.ROOTS["source"]` (t2r does so when it registers
its classes with transformers); `delta` itself cannot import it (see there).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from ..errors import NotAT2RModelError, T2RError
from ..evaluate import hash_tensors
from ..sources import DEFAULT_MODEL, GEMMA3_MODEL, load_model, resolve
from .delta import ROOTS, hash_files, rewrite

ALIASES = (DEFAULT_MODEL, GEMMA3_MODEL)  # recorded as typed: the wheel's file is found again wherever it is installed
_LOADED: dict[str, torch.nn.Module] = {}  # source fingerprint -> the model loaded from it, inside `loaded_source`


class StageSourceError(NotAT2RModelError):
    """A stage saved over a source model that is missing or no longer the one it was saved against."""


def _files(kind: str, path: Path) -> list[Path]:
    """The files a source's weights are read from: a GGUF file, or a directory's config.json and safetensors."""
    if kind == "gguf":
        return [path]
    return [path / "config.json", *sorted(path.glob("*.safetensors"))]


def files_fingerprint(files: list[Path]) -> str:
    return hash_files(files).hexdigest()


def tensors_fingerprint(tensors: dict[str, torch.Tensor], names) -> str:
    """sha256 of the named tensors: names, dtypes, shapes and bytes (float32 bytes: bit for bit)."""
    return hash_tensors(hashlib.sha256(), ((name, tensors[name]) for name in sorted(names))).hexdigest()


def source_reference(spec: str | None) -> dict | None:
    """{"spec", "kind", "path", "fingerprint"} of a local source (GGUF file or HF directory), or None for a hub id (a
    stage over it stays whole)."""
    source = resolve(spec)
    if source.kind == "hub":
        return None
    path = (Path(source.path) / source.gguf_file if source.gguf_file else Path(source.path)).resolve()
    return {"spec": spec or DEFAULT_MODEL, "kind": source.kind, "path": str(path),
            "fingerprint": files_fingerprint(_files(source.kind, path))}


@contextmanager
def loaded_source(spec: str | None, model: torch.nn.Module) -> Iterator[None]:
    """Inside the block, a stage over the source `spec` takes the source's tensors from `model` (already loaded from
    it, unchanged: the pipeline's original model) instead of loading it again; they are copied and checked bit for
    bit as a load's are."""
    ref = source_reference(spec)
    if ref is not None:
        _LOADED[ref["fingerprint"]] = model
    try:
        yield
    finally:
        if ref is not None:
            _LOADED.pop(ref["fingerprint"], None)


def checked_source(stage_dir: Path, ref: dict) -> str:
    """The spec to load the source of the stage at `stage_dir` from, once its files are checked to be the ones the
    stage was saved against."""
    redo = (f"redo the stage (`t2r pipeline ... --redo {stage_dir.name}`) or restore the source; a pipeline's final "
            "model is saved whole and does not need it")
    spec = ref["spec"] if ref.get("spec") in ALIASES else ref["path"]
    try:
        path = Path(ref["path"])
        if ref.get("spec") in ALIASES:
            source = resolve(spec)
            path = Path(source.path) / source.gguf_file
        current = files_fingerprint(_files(ref["kind"], path))
    except (OSError, T2RError, KeyError):
        raise StageSourceError(f"{stage_dir} is saved as changes over its source model {ref.get('spec')!r} "
                               f"({ref.get('path')}), which is gone: {redo}") from None
    if current != ref.get("fingerprint"):
        raise StageSourceError(f"{stage_dir} is saved as changes over its source model {ref['spec']!r} ({path}), "
                               f"whose files have changed since: {redo}")
    return spec


def source_tensors(stage_dir: Path, ref: dict) -> dict[str, torch.Tensor]:
    """The tensors the stage at `stage_dir` takes from its source: loaded as the pipeline loaded it, checked bit for
    bit against what the stage was saved with."""
    spec = checked_source(stage_dir, ref)
    loaded = _LOADED.get(ref["fingerprint"])
    model = loaded if loaded is not None else load_model(spec)[0]
    tensors = {name: t.detach().clone() if loaded is not None else t for name, t in model.state_dict().items()
               if name in ref["bytes"]}
    if set(tensors) != set(ref["bytes"]) or tensors_fingerprint(tensors, tensors) != ref["base_fingerprint"]:
        raise StageSourceError(f"{stage_dir}: its source model {ref['spec']!r} loads to other weights than when the "
                               "stage was saved (another transformers or gguf release?): redo the stage (`t2r "
                               f"pipeline ... --redo {stage_dir.name}`); a pipeline's final model is saved whole and "
                               "does not need it")
    return tensors


ROOTS["source"] = source_tensors


def with_base(ref: dict, tensors: dict[str, torch.Tensor], used) -> dict:
    """`ref` completed with what the stage takes from the source's `tensors`: the names `used`, their bytes and
    their fingerprint."""
    return {**ref, "base_fingerprint": tensors_fingerprint(tensors, used),
            "bytes": {name: tensors[name].numel() * tensors[name].element_size() for name in sorted(used)}}


def rewrite_over_source(stage_dir: str | Path, ref: dict, source: dict[str, torch.Tensor]) -> dict:
    """Replace the full weights saved in `stage_dir` by the tensors that differ from its source model's (the rest
    as `t2r.stages.delta.rewrite_as_delta`): `ref` is `source_reference(spec)`, `source` the source's tensors as
    `t2r.sources.load_model` loaded them (the pipeline's own copy; every later load rebuilds them from the source and
    checks them bit for bit)."""
    return rewrite(Path(stage_dir), source, ref["spec"], lambda own, changed: {
        "source": with_base(ref, source, set(own) - set(changed))})
