"""Text sources -> documents: the ``source`` string of :func:`load_documents`.

* a text file (any UTF-8 text; one document), a ``.jsonl`` file (one JSON object per line, the
  document is its ``text`` field), or a directory (its ``.txt .md .rst .text`` files, recursively,
  in sorted path order, hidden files and folders skipped; one document per file);
* ``hf:NAME[:CONFIG[:SPLIT]]``: a HuggingFace dataset through the optional ``datasets`` package
  (split defaults to ``train``);
* a built-in offline corpus, made from Debian packages fetched with ``apt-get download`` and
  unpacked with ``dpkg -x`` into ``<cache>/debian/`` (nothing is installed system-wide):
  ``austen`` (r-cran-janeaustenr: six novels, one document each), ``kjv`` (bible-kjv-text, read
  with the ``bible`` program of bible-kjv: one document per book), ``pydocs`` (python3.11-doc:
  the reST sources of the Python 3.11 docs, one document per file) and ``mix`` (the three
  interleaved round-robin: austen[0], kjv[0], pydocs[0], austen[1], ...).

The cache folder is the ``cache_dir`` argument, else ``$T2R_CACHE``, else ``~/.cache/t2r/corpora``.
Token blocks, the split and prepared folders are :mod:`t2r.data`.
"""

from __future__ import annotations

import gzip
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
from pathlib import Path
from typing import Callable

from .errors import DataError

logger = logging.getLogger(__name__)

TEXT_SUFFIXES = (".txt", ".md", ".rst", ".text")
BUILTIN_VERSION = 1  # bump when a built-in corpus is read differently
_KJV_RANGE = "Gen1:1-Rev22:21"


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
            "pip install 't2r[corpora]' (or pip install datasets; and be online), or use a local text/.jsonl file"
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
        raise DataError("the built-in 'austen' corpus is stored as R data, read by the optional rdata package: "
                        "pip install 't2r[corpora]' (or pip install rdata), or give a text file or folder")
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


def cache_root(cache_dir: str | Path | None) -> Path:
    """t2r's cache folder: `cache_dir` if given, else $T2R_CACHE, else ~/.cache/t2r/corpora."""
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
        documents = BUILTIN_CORPORA[spec](cache_root(cache_dir))
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
