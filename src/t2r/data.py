"""Documents -> fixed-length token blocks, split into train and held-out, cached on disk.

The ``source`` string of :func:`prepare_data` is anything :func:`t2r.corpora.load_documents` reads
(a text, ``.jsonl`` or folder path, ``hf:NAME[:CONFIG[:SPLIT]]``, or a built-in corpus: ``austen``,
``kjv``, ``pydocs``, ``mix``), or a folder written by ``prepare_data(..., out_dir=...)``
(recognised by its ``meta.json``).

Packing: every document is tokenised without special tokens, the documents are joined with the
tokenizer's EOS token between them, and the stream is cut into rows of ``block_size`` tokens; the
tail that does not fill a row is dropped.

Split rule (version 2), on the token stream, so that the held-out text is the same whatever the block size and
long enough to measure memory: the stream is cut into stretches of 16,384 tokens and stretch ``s`` (0-based) is held
out when ``s % 10 == 9``. A block lying wholly in a held-out stretch is held out, one lying wholly in train stretches
is train, and one that straddles both (only when the block size does not divide 16,384) is dropped. So about 10% of
the tokens are held out, in contiguous stretches of 16,384 tokens spread over the corpus: the long held-out documents
of `t2r eval --context 16k --positions`. A block longer than a stretch is never held out. A corpus shorter than ten
stretches (163,840 tokens) uses the block rule of version 1 instead: block ``i`` is held out when ``i % 10 == 9``,
and a corpus of 2 to 9 blocks holds out its last block. A corpus needs at least two blocks. It is a split of the
token stream, not of documents: the text just before a held-out stretch is in train.

Cache: the blocks are stored as safetensors + ``meta.json`` under ``<cache>/blocks/<key>/``, where
the key hashes the tokenizer (name, size, EOS, sha256 of its serialised vocabulary and merges),
the source (spec, and the size and mtime of every file it reads), the block size and the split
rule version. The cache folder is the ``cache_dir`` argument, else ``$T2R_CACHE``, else
``~/.cache/t2r/corpora``; downloaded Debian packages are unpacked under ``<cache>/debian/``.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoTokenizer

from . import sources
from .corpora import BUILTIN_CORPORA, BUILTIN_VERSION, _text_files, cache_root, load_documents
from .errors import DataError
from .io import atomic_write, write_json
from .sources import DEFAULT_GGUF  # noqa: F401  (re-exported: the tests name data.DEFAULT_GGUF)

logger = logging.getLogger(__name__)

HELDOUT_EVERY = 10
HELDOUT_STRETCH = 16384  # tokens: the length of a held-out document
SPLIT_VERSION = 2
SPLIT_RULE = ("stretch s of 16,384 tokens is held out iff s % 10 == 9, blocks straddling train and held-out "
              "stretches are dropped; under 10 stretches: block i is held out iff i % 10 == 9, a corpus of 2-9 "
              "blocks holds out its last block")
FORMAT = "t2r-token-blocks"


@dataclass
class TokenBlocks:
    """Packed token blocks: ``train`` and ``heldout`` are LongTensors of shape (N, block_size)."""

    train: torch.Tensor
    heldout: torch.Tensor
    meta: dict


# ----------------------------------------------------------------------------- tokens and blocks


def _check_block_size(block_size: int) -> None:
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size <= 0:
        raise DataError(f"block_size must be a positive integer, got {block_size!r}")


def _eos_id(tokenizer) -> int:
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise DataError(
            f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no EOS token, which "
            "separates documents; set tokenizer.eos_token first"
        )
    return int(eos)


def _encode_documents(documents: list[str], tokenizer) -> list[list[int]]:
    """Token ids of each document, without special tokens."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:  # a slow (pure Python) tokenizer
        return [tokenizer.encode(text, add_special_tokens=False) for text in documents]
    encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
    ids: list[list[int]] = []
    for start in range(0, len(documents), 64):  # bounded memory for the Encoding objects
        ids.extend(e.ids for e in encode(documents[start:start + 64], add_special_tokens=False))
    return ids


def _pack(documents: list[str], tokenizer, block_size: int, name: str) -> torch.Tensor:
    _check_block_size(block_size)
    eos = torch.tensor([_eos_id(tokenizer)], dtype=torch.long)
    pieces: list[torch.Tensor] = []
    for ids in _encode_documents(documents, tokenizer):
        if pieces:
            pieces.append(eos)
        pieces.append(torch.tensor(ids, dtype=torch.long))
    stream = torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.long)  # (T,)
    n_blocks = stream.numel() // block_size
    if n_blocks == 0:
        raise DataError(
            f"corpus {name} has {stream.numel()} tokens, fewer than one block of {block_size}; "
            "give more text or a smaller --block-size"
        )
    return stream[: n_blocks * block_size].view(n_blocks, block_size)  # (N, block_size)


def build_blocks(documents: list[str], tokenizer, block_size: int) -> torch.Tensor:
    """Tokenise ``documents``, join them with EOS, cut into (N, block_size) int64 rows.

    The tail that does not fill a whole block is dropped. Raises DataError when the text does not
    fill one block.
    """
    return _pack(documents, tokenizer, block_size, name=f"of {len(documents)} documents")


def _split(blocks: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply the split rule of the module docstring: (train, heldout)."""
    n_blocks, block_size = blocks.shape
    if n_blocks < 2:
        raise DataError(
            f"corpus {name} has {blocks.numel()} tokens, one block of {block_size}; it needs two "
            "(one train, one held-out): give more text or a smaller --block-size"
        )
    train, heldout = split_masks(n_blocks, block_size)  # (N,) each
    if not heldout.any():
        raise DataError(f"corpus {name} has no held-out block of {block_size} tokens: held-out documents are "
                        f"stretches of {HELDOUT_STRETCH:,} tokens; use a block size (or --context) of "
                        f"{HELDOUT_STRETCH} or less")
    return blocks[train].contiguous(), blocks[heldout].contiguous()


def split_masks(n_blocks: int, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, held-out) bool masks [N] over the blocks of a stream, by the split rule of the module docstring."""
    if n_blocks * block_size < HELDOUT_EVERY * HELDOUT_STRETCH:  # a short corpus: the block rule
        heldout = torch.arange(n_blocks) % HELDOUT_EVERY == HELDOUT_EVERY - 1  # (N,)
        if not heldout.any():
            heldout[-1] = True
        return ~heldout, heldout
    first = torch.arange(n_blocks) * block_size // HELDOUT_STRETCH  # (N,) stretch of each block's first token
    last = (torch.arange(1, n_blocks + 1) * block_size - 1) // HELDOUT_STRETCH  # (N,) ... and of its last token
    held_stretch = lambda s: s % HELDOUT_EVERY == HELDOUT_EVERY - 1  # noqa: E731
    heldout = (first == last) & held_stretch(first)
    # a block covering stretches first..last is train iff none of them is held out
    touches_heldout = (last // HELDOUT_EVERY > first // HELDOUT_EVERY) | held_stretch(first) | held_stretch(last)
    return ~touches_heldout, heldout


# ----------------------------------------------------------------------------- identity and cache


def tokenizer_identity(tokenizer) -> dict:
    """What identifies a tokenizer for caching: its name, vocabulary size, EOS id and a hash of its full definition."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        content = backend.to_str()
    else:
        content = json.dumps(sorted(tokenizer.get_vocab().items()))
    return {
        "name_or_path": str(getattr(tokenizer, "name_or_path", "")),
        "vocab_size": len(tokenizer),
        "eos_token_id": _eos_id(tokenizer),
        "sha256": hashlib.sha256(content.encode("utf-8")).hexdigest(),
    }


def _same_tokenizer(a: dict, b: dict) -> bool:
    """Same vocabulary, merges and EOS; the path it was loaded from may differ."""
    return all(a.get(k) == b.get(k) for k in ("vocab_size", "eos_token_id", "sha256"))


def _source_fingerprint(source: str) -> dict:
    spec = source.strip()
    if spec.startswith("hf:"):
        return {"hf": spec}
    if spec in BUILTIN_CORPORA:
        return {"builtin": spec, "version": BUILTIN_VERSION}
    path = Path(spec).expanduser().resolve()
    files = _text_files(path) if path.is_dir() else [path]
    stats = [(p.relative_to(path).as_posix() if path.is_dir() else p.name,
              p.stat().st_size, p.stat().st_mtime_ns) for p in files if p.exists()]
    return {"path": str(path), "files": stats}


def _cache_key(fingerprint: dict, tokenizer_id: dict, block_size: int) -> str:
    material = {"source": fingerprint, "tokenizer": tokenizer_id, "block_size": block_size,
                "split_version": SPLIT_VERSION, "format": FORMAT}
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:32]


def _write_blocks(directory: Path, blocks: TokenBlocks) -> None:
    """train/heldout.safetensors, then meta.json (its presence marks a complete folder)."""
    directory.mkdir(parents=True, exist_ok=True)
    tag = {"key": blocks.meta["key"]}
    for split in ("train", "heldout"):
        tensor = getattr(blocks, split)
        atomic_write(directory / f"{split}.safetensors",
                      lambda tmp, t=tensor: save_file({"blocks": t}, tmp, metadata=tag))
    write_json(directory / "meta.json", blocks.meta, sort_keys=True)


def read_meta(directory: Path) -> dict | None:
    """The meta of a prepared folder, or None when ``directory`` is not one."""
    try:
        meta = json.loads((directory / "meta.json").read_text("utf-8"))
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) and meta.get("format") == FORMAT else None


def _read_blocks(directory: Path, meta: dict) -> TokenBlocks:
    tensors = {}
    for split in ("train", "heldout"):
        path = directory / f"{split}.safetensors"
        try:
            with safe_open(str(path), framework="pt") as handle:
                if (handle.metadata() or {}).get("key") != meta.get("key"):
                    raise DataError(f"{path} does not belong to {directory / 'meta.json'}")
                tensors[split] = handle.get_tensor("blocks")
        except OSError as error:
            raise DataError(f"cannot read {path} ({error}); prepare the data again") from error
    return TokenBlocks(train=tensors["train"], heldout=tensors["heldout"], meta=meta)


def _load_prepared(directory: Path, meta: dict, tokenizer_id: dict, block_size: int) -> TokenBlocks:
    if not _same_tokenizer(meta.get("tokenizer", {}), tokenizer_id):
        raise DataError(
            f"{directory} was prepared with another tokenizer "
            f"({meta.get('tokenizer', {}).get('name_or_path')!r}) than the one given "
            f"({tokenizer_id['name_or_path']!r}): the tokenizers differ; prepare the data again "
            "with this model's tokenizer"
        )
    if meta.get("block_size") != block_size:
        raise DataError(
            f"{directory} holds blocks of {meta.get('block_size')} tokens, not {block_size}; "
            f"use --block-size {meta.get('block_size')} or prepare the data again"
        )
    return _read_blocks(directory, meta)


def _build(source: str, tokenizer, tokenizer_id: dict, block_size: int, key: str,
           root: Path) -> TokenBlocks:
    documents = load_documents(source, cache_dir=root)
    blocks = _pack(documents, tokenizer, block_size, name=repr(source))
    train, heldout = _split(blocks, name=repr(source))
    meta = {
        "format": FORMAT, "key": key, "source": source, "block_size": block_size,
        "documents": len(documents), "train_blocks": train.shape[0],
        "heldout_blocks": heldout.shape[0], "train_tokens": train.numel(),
        "heldout_tokens": heldout.numel(), "split_rule": SPLIT_RULE,
        "split_version": SPLIT_VERSION, "tokenizer": tokenizer_id,
    }
    logger.info("%s: %d train and %d held-out tokens in blocks of %d",
                source, meta["train_tokens"], meta["heldout_tokens"], block_size)
    return TokenBlocks(train=train, heldout=heldout, meta=meta)


def _cached_blocks(source: str, tokenizer, block_size: int, root: Path) -> TokenBlocks:
    tokenizer_id = tokenizer_identity(tokenizer)
    key = _cache_key(_source_fingerprint(source), tokenizer_id, block_size)
    directory = root / "blocks" / key
    meta = read_meta(directory)
    if meta is not None:
        try:
            blocks = _read_blocks(directory, meta)
            logger.info("loaded %s from the cache %s", source, directory)
            return blocks
        except DataError as error:
            logger.warning("ignoring a damaged cache entry: %s", error)
    blocks = _build(source, tokenizer, tokenizer_id, block_size, key, root)
    try:
        _write_blocks(directory, blocks)
    except OSError as error:
        logger.warning("could not cache the token blocks in %s: %s", directory, error)
    return blocks


def prepare_data(
    source: str,
    tokenizer,
    *,
    block_size: int = 512,
    cache_dir: str | Path | None = None,
    out_dir: str | Path | None = None,
) -> TokenBlocks:
    """Token blocks of ``source`` split into train / held-out, cached on disk.

    ``source`` is anything :func:`load_documents` reads, or a folder written earlier with
    ``out_dir`` (used as is when ``tokenizer`` and ``block_size`` match it). With ``out_dir``, also
    writes ``train.safetensors``, ``heldout.safetensors`` and ``meta.json`` there.
    """
    _check_block_size(block_size)
    prepared = Path(source.strip()).expanduser() if source.strip() else None
    meta = read_meta(prepared) if prepared is not None and prepared.is_dir() else None
    if meta is not None:
        blocks = _load_prepared(prepared, meta, tokenizer_identity(tokenizer), block_size)
    else:
        blocks = _cached_blocks(source, tokenizer, block_size, cache_root(cache_dir))
    if out_dir is not None:
        _write_blocks(Path(out_dir).expanduser(), blocks)
    return blocks


def tokenizer_of(model: str | None):
    """The tokenizer of ``model`` (see :func:`t2r.sources.resolve`; None is the default model)."""
    source = sources.resolve(model)
    kwargs = {"gguf_file": source.gguf_file} if source.gguf_file else {}
    try:
        return AutoTokenizer.from_pretrained(source.path, **kwargs)
    except (OSError, ValueError) as error:
        raise DataError(f"cannot load the tokenizer of {source.describe()} ({error})") from error
