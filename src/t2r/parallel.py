"""Parallel (translation) data: sentence pairs from aligned files, TSV, jsonl or gettext catalogues, deduplicated and
split into train / held-out by content; written as two jsonl files beside a ``meta.json``.

Sources (the ``source`` of :func:`read_pairs`, and of ``t2r data``):

* ``parallel:A,B``: two aligned text files, line i of A is translated by line i of B. Files with different line
  counts are refused (the message names both counts).
* ``parallel:F.tsv``: one pair per line, source TAB target (a line without exactly one TAB is refused).
* ``parallel:F.jsonl``: one JSON object per line with string fields ``src`` and ``tgt``.
* ``parallel:hf:NAME:CONFIG:SPLIT:SRC-TGT``: a HF translation dataset through the optional ``datasets`` package
  (online, or in its local cache); each record holds ``{"translation": {SRC: ..., TGT: ...}}`` or the two language
  fields at its top level, e.g. ``parallel:hf:wmt14:de-en:validation:en-de``.
* ``gettext:LANG[:DIR]``: English ``msgid`` -> translated ``msgstr`` of every ``.mo`` catalogue under
  ``DIR/LANG/LC_MESSAGES/`` (default DIR: /usr/share/locale), read directly from the GNU .mo format (sorted file
  order; message contexts dropped; plural entries give their singular forms; untranslated entries skipped).

Cleaning: whitespace runs (newlines included) become one space. A pair with an empty side is skipped and counted
(``skipped_empty``, logged with its first line numbers), never an error. A pair whose source has no letter once
format directives are removed (``%s: %s``, ``{0}``, ``%(name)d``) is dropped (``format_only``). Pairs are
deduplicated on the normalised source (lower case, one space): the first wins.

Split (version 1): a pair is held out iff the first 8 hex digits of sha256(normalised source), as an integer, are
divisible by ``HELDOUT_EVERY`` (50: about 2%); a corpus that would hold out nothing holds out the pair with the
smallest hash. Train then loses every pair whose normalised source or target equals a held-out one, so no held-out
sentence is seen in training, whatever its index.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path

from .errors import DataError
from .io import write_json, write_text

logger = logging.getLogger(__name__)

FORMAT = "t2r-parallel"
SPLIT_VERSION = 1
HELDOUT_EVERY = 50
PREFIXES = ("parallel:", "gettext:")
DEFAULT_LOCALE_DIR = "/usr/share/locale"
MO_MAGIC = (0x950412DE, 0xDE120495)
FORMAT_DIRECTIVE = re.compile(r"%(\([^)]*\))?[-#0 +'I]*(\d+|\*)?(\.(\d+|\*))?(hh|h|ll|l|L|q|j|z|t)?[a-zA-Z%]"
                              r"|\{[^{}]*\}|\$\{[^{}]*\}|<[^<>]*>")


@dataclass
class ParallelCorpus:
    """Sentence pairs (source, target) after cleaning, with what was skipped on the way."""

    pairs: list[tuple[str, str]]
    source: str
    skipped_empty: int = 0
    format_only: int = 0
    duplicates: int = 0
    notes: list[str] = field(default_factory=list)


def is_parallel_source(spec: str) -> bool:
    return spec.strip().startswith(PREFIXES)


def clean(text: str) -> str:
    return " ".join(text.split())


def content_key(text: str) -> str:
    """What two sentences must share to count as the same: lower case, whitespace runs as one space."""
    return " ".join(text.lower().split())


def is_format_only(text: str) -> bool:
    """True when no letter is left once printf / brace / markup directives are removed ("%s: %s", "{0}")."""
    return not any(ch.isalpha() for ch in FORMAT_DIRECTIVE.sub("", text))


# ----------------------------------------------------------------------------- readers


def _lines(path: Path) -> list[str]:
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise DataError(f"parallel file {path} does not exist") from None
    except UnicodeDecodeError as error:
        raise DataError(f"{path} is not UTF-8 text ({error}); convert it to UTF-8 first") from None


def _aligned_files(first: Path, second: Path) -> list[tuple[int, str, str]]:
    a, b = _lines(first), _lines(second)
    if len(a) != len(b):
        raise DataError(f"the parallel files are not aligned: {first} has {len(a)} lines, {second} has {len(b)} "
                        "lines; give two files with one translation per line, line for line")
    return [(i, x, y) for i, (x, y) in enumerate(zip(a, b), start=1)]


def _tsv(path: Path) -> list[tuple[int, str, str]]:
    rows = []
    for i, line in enumerate(_lines(path), start=1):
        if not line.strip():
            rows.append((i, "", ""))
            continue
        parts = line.split("\t")
        if len(parts) != 2:
            raise DataError(f"{path}:{i} has {len(parts) - 1} TABs; a TSV line is source TAB target")
        rows.append((i, parts[0], parts[1]))
    return rows


def _jsonl(path: Path) -> list[tuple[int, str, str]]:
    rows = []
    for i, line in enumerate(_lines(path), start=1):
        if not line.strip():
            rows.append((i, "", ""))
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(f"{path}:{i} is not valid JSON ({error})") from None
        if not isinstance(record, dict) or not all(isinstance(record.get(k), str) for k in ("src", "tgt")):
            raise DataError(f'{path}:{i} needs string fields "src" and "tgt", like {{"src": "...", "tgt": "..."}}')
        rows.append((i, record["src"], record["tgt"]))
    return rows


def read_mo(path: Path) -> list[tuple[str, str]]:
    """(msgid, msgstr) of a GNU .mo catalogue: the header entry, untranslated entries and message contexts left out,
    plural entries as their singular forms. Decoded with the charset its header names (UTF-8 if none)."""
    data = path.read_bytes()
    if len(data) < 20:
        raise DataError(f"{path} is not a .mo file (too short)")
    magic = struct.unpack("<I", data[:4])[0]
    if magic not in MO_MAGIC:
        raise DataError(f"{path} is not a .mo file (magic {magic:#x})")
    order = "<" if magic == MO_MAGIC[0] else ">"
    _, count, originals, translations = struct.unpack(order + "4I", data[4:20])

    def entry(table: int, i: int) -> bytes:
        length, offset = struct.unpack(order + "2I", data[table + 8 * i: table + 8 * i + 8])
        return data[offset: offset + length]

    raw = [(entry(originals, i), entry(translations, i)) for i in range(count)]
    charset = "utf-8"
    for msgid, msgstr in raw:
        if msgid == b"":
            found = re.search(rb"charset=([-\w]+)", msgstr)
            charset = found.group(1).decode("ascii") if found else "utf-8"
    pairs = []
    for msgid, msgstr in raw:
        if not msgid or not msgstr:
            continue
        text = msgid.split(b"\x04")[-1].split(b"\x00")[0]
        target = msgstr.split(b"\x00")[0]
        try:
            pairs.append((text.decode(charset), target.decode(charset)))
        except (UnicodeDecodeError, LookupError):
            continue
    return pairs


def _hf_rows(spec: str) -> list[tuple[int, str, str]]:
    parts = spec.split(":")
    if len(parts) != 4 or not parts[0] or "-" not in parts[3]:
        raise DataError(f"hf:{spec}: write a translation dataset as parallel:hf:NAME:CONFIG:SPLIT:SRC-TGT, "
                        "e.g. parallel:hf:wmt14:de-en:validation:en-de")
    name, config, split, direction = parts
    src_lang, tgt_lang = direction.split("-", 1)
    try:
        import datasets
    except ImportError:
        raise DataError("parallel:hf: needs the 'datasets' package: pip install datasets (and be online), or give "
                        "local files") from None
    try:
        dataset = datasets.load_dataset(name, config or None, split=split or "train")
    except Exception as error:  # datasets raises many kinds; all mean "cannot get it"
        raise DataError(f"cannot load hf:{spec} ({error}); go online (or unset HF_HUB_OFFLINE), or give local "
                        "files") from None
    rows = []
    for i, record in enumerate(dataset, start=1):
        pair = record.get("translation", record) if isinstance(record, dict) else {}
        if not all(isinstance(pair.get(k), str) for k in (src_lang, tgt_lang)):
            raise DataError(f"hf:{spec} record {i} has no {src_lang!r} and {tgt_lang!r} texts (its fields: "
                            f"{sorted(pair)})")
        rows.append((i, pair[src_lang], pair[tgt_lang]))
    return rows


def _gettext(spec: str) -> tuple[list[tuple[int, str, str]], list[str]]:
    lang, _, root = spec.partition(":")
    if not re.fullmatch(r"[A-Za-z]{2,3}(_[A-Za-z]{2})?(@\w+)?", lang):
        raise DataError(f"gettext:LANG[:DIR] needs a language code like de or pt_BR, got {lang!r}")
    folder = Path(root or DEFAULT_LOCALE_DIR).expanduser() / lang / "LC_MESSAGES"
    files = sorted(folder.glob("*.mo"))
    if not files:
        raise DataError(f"no .mo catalogues under {folder}: install packages with {lang} translations, or give "
                        "gettext:LANG:DIR with DIR/LANG/LC_MESSAGES/*.mo")
    rows, number = [], 0
    for path in files:
        for src, tgt in read_mo(path):
            number += 1
            rows.append((number, src, tgt))
    return rows, [f"{len(files)} catalogues under {folder}"]


def _raw_rows(spec: str) -> tuple[list[tuple[int, str, str]], list[str]]:
    if spec.startswith("gettext:"):
        return _gettext(spec[len("gettext:"):])
    body = spec[len("parallel:"):]
    if body.startswith("hf:"):
        return _hf_rows(body[len("hf:"):]), []
    names = [p.strip() for p in body.split(",") if p.strip()]
    if len(names) == 2:
        return _aligned_files(Path(names[0]).expanduser(), Path(names[1]).expanduser()), []
    if len(names) == 1 and names[0].endswith((".tsv", ".jsonl")):
        path = Path(names[0]).expanduser()
        if not path.is_file():
            raise DataError(f"parallel file {path} does not exist")
        return (_tsv(path) if path.suffix == ".tsv" else _jsonl(path)), []
    raise DataError(f"cannot read parallel source {spec!r}: give parallel:SRC_FILE,TGT_FILE, parallel:FILE.tsv, "
                    "parallel:FILE.jsonl, parallel:hf:NAME:CONFIG:SPLIT:SRC-TGT or gettext:LANG[:DIR]")


def read_pairs(source: str) -> ParallelCorpus:
    """Read, clean and deduplicate the pairs of `source` (see the module docstring)."""
    spec = source.strip()
    if not is_parallel_source(spec):
        raise DataError(f"{source!r} is not a parallel source: it starts with parallel: or gettext:")
    rows, notes = _raw_rows(spec)
    corpus = ParallelCorpus(pairs=[], source=spec, notes=notes)
    empty_lines, seen = [], set()
    for number, src, tgt in rows:
        src, tgt = clean(src), clean(tgt)
        if not src or not tgt:
            empty_lines.append(number)
            continue
        if is_format_only(src):
            corpus.format_only += 1
            continue
        key = content_key(src)
        if key in seen:
            corpus.duplicates += 1
            continue
        seen.add(key)
        corpus.pairs.append((src, tgt))
    corpus.skipped_empty = len(empty_lines)
    if empty_lines:
        shown = ", ".join(map(str, empty_lines[:5])) + (", ..." if len(empty_lines) > 5 else "")
        logger.warning("%s: skipped %d pairs with an empty side (lines %s)", spec, len(empty_lines), shown)
    if len(corpus.pairs) < 2:
        raise DataError(f"parallel source {spec!r} has {len(corpus.pairs)} usable pairs; it needs at least two "
                        "(one train, one held-out)")
    return corpus


# ----------------------------------------------------------------------------- split and files


def _hash(text: str) -> int:
    return int(hashlib.sha256(content_key(text).encode("utf-8")).hexdigest()[:8], 16)


def split_pairs(pairs: list[tuple[str, str]]) -> tuple[list[tuple[str, str]], list[tuple[str, str]], int]:
    """(train, held-out, pairs removed from train because a held-out sentence equals one of theirs)."""
    hashes = [_hash(src) for src, _ in pairs]
    held = [h % HELDOUT_EVERY == 0 for h in hashes]
    if not any(held):
        held[min(range(len(pairs)), key=hashes.__getitem__)] = True
    heldout = [p for p, h in zip(pairs, held) if h]
    blocked = {content_key(s) for pair in heldout for s in pair}
    train = [p for p, h in zip(pairs, held) if not h]
    kept = [p for p in train if content_key(p[0]) not in blocked and content_key(p[1]) not in blocked]
    if not kept:
        raise DataError("every pair of this corpus is held out or overlaps a held-out one: give more pairs")
    return kept, heldout, len(train) - len(kept)


def _write_jsonl(path: Path, pairs: list[tuple[str, str]]) -> None:
    text = "".join(json.dumps({"src": s, "tgt": t}, ensure_ascii=False) + "\n" for s, t in pairs)
    write_text(path, text)


def prepare_parallel(source: str, out_dir: str | Path) -> dict:
    """Read `source`, split it, write ``train.jsonl``, ``heldout.jsonl`` and ``meta.json`` (last: its presence
    marks a complete folder) to `out_dir`; returns the meta."""
    corpus = read_pairs(source)
    train, heldout, overlap = split_pairs(corpus.pairs)
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    _write_jsonl(out / "train.jsonl", train)
    _write_jsonl(out / "heldout.jsonl", heldout)
    meta = {"format": FORMAT, "source": corpus.source, "split_version": SPLIT_VERSION, "train_pairs": len(train),
            "heldout_pairs": len(heldout), "skipped_empty": corpus.skipped_empty, "format_only": corpus.format_only,
            "duplicates": corpus.duplicates, "removed_overlapping_heldout": overlap,
            "src_chars": sum(len(s) for s, _ in corpus.pairs), "notes": corpus.notes}
    write_json(out / "meta.json", meta, sort_keys=True)
    logger.info("%s: %d train and %d held-out pairs in %s", corpus.source, len(train), len(heldout), out)
    return meta


def is_parallel_dir(path: str | Path) -> bool:
    try:
        meta = json.loads((Path(path).expanduser() / "meta.json").read_text("utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and meta.get("format") == FORMAT


def load_pairs(data: str | Path, split: str = "train") -> list[tuple[str, str]]:
    """The pairs of one split of a folder written by :func:`prepare_parallel`, or of a parallel source spec
    (split there on the fly)."""
    if split not in ("train", "heldout"):
        raise DataError(f"split is train or heldout, got {split!r}")
    if is_parallel_source(str(data)):
        train, heldout, _ = split_pairs(read_pairs(str(data)).pairs)
        return train if split == "train" else heldout
    if not is_parallel_dir(data):
        raise DataError(f"{str(data)!r} is not parallel data: give a folder from `t2r data parallel:... --out DIR` "
                        "or a parallel:/gettext: source")
    path = Path(data).expanduser() / f"{split}.jsonl"
    return [(r["src"], r["tgt"]) for r in map(json.loads, path.read_text("utf-8").splitlines()) if r]
