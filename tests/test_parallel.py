"""Tests of t2r.parallel: the parallel sources, cleaning, the content split, and `t2r data` on them."""

import json
import struct
import sys
import types
from pathlib import Path

import pytest

from t2r import parallel
from t2r.cli import main
from t2r.errors import DataError
from t2r.parallel import (
    content_key,
    is_format_only,
    load_pairs,
    prepare_parallel,
    read_mo,
    read_pairs,
    split_pairs,
)


def write_mo(path: Path, entries: list[tuple[bytes, bytes]], charset: str = "UTF-8") -> Path:
    """A GNU .mo file (little-endian, revision 0) holding the header entry and `entries`."""
    header = (b"", f"Content-Type: text/plain; charset={charset}\n".encode("ascii"))
    items = sorted([header, *entries])
    n = len(items)
    originals, translations = 28, 28 + 8 * n
    offset = 28 + 16 * n
    blob, table_o, table_t = b"", b"", b""
    for msgid, _ in items:
        table_o += struct.pack("<2I", len(msgid), offset + len(blob))
        blob += msgid + b"\x00"
    for _, msgstr in items:
        table_t += struct.pack("<2I", len(msgstr), offset + len(blob))
        blob += msgstr + b"\x00"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(struct.pack("<7I", 0x950412DE, 0, n, originals, translations, 0, 0) + table_o + table_t + blob)
    return path


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


SENTENCES = [(f"Cannot open file number {i}.", f"Datei Nummer {i} kann nicht geöffnet werden.") for i in range(200)]


def test_format_only_strings():
    assert is_format_only("%s: %s")
    assert is_format_only("%(name)s - %d%%")
    assert is_format_only("{0} / {1}")
    assert is_format_only("  ...  ")
    assert not is_format_only("%s: file not found")
    assert not is_format_only("Save")


def test_aligned_files_clean_skip_empty_and_dedupe(tmp_path, caplog):
    src = write_lines(tmp_path / "a.en", ["Hello  world.", "", "%s: %s", "hello WORLD.", "Save"])
    tgt = write_lines(tmp_path / "b.de", ["Hallo Welt.", "leer", "%s: %s", "Hallo!", "Speichern"])
    corpus = read_pairs(f"parallel:{src},{tgt}")
    assert corpus.pairs == [("Hello world.", "Hallo Welt."), ("Save", "Speichern")]
    assert (corpus.skipped_empty, corpus.format_only, corpus.duplicates) == (1, 1, 1)
    assert "skipped 1 pairs with an empty side (lines 2)" in caplog.text


def test_misaligned_files_name_both_counts(tmp_path):
    src = write_lines(tmp_path / "a.en", ["one", "two", "three"])
    tgt = write_lines(tmp_path / "b.de", ["eins", "zwei"])
    with pytest.raises(DataError, match=r"a\.en has 3 lines, .*b\.de has 2 lines"):
        read_pairs(f"parallel:{src},{tgt}")


def test_misaligned_files_cli_one_line_exit_2(tmp_path, capsys):
    src = write_lines(tmp_path / "a.en", ["one", "two", "three"])
    tgt = write_lines(tmp_path / "b.de", ["eins", "zwei"])
    assert main(["data", f"parallel:{src},{tgt}", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("t2r data: error:") and "3 lines" in err and "2 lines" in err
    assert not (tmp_path / "out").exists()


def test_tsv_and_jsonl(tmp_path):
    tsv = tmp_path / "p.tsv"
    tsv.write_text("Open\tÖffnen\n\nClose\tSchließen\n", encoding="utf-8")
    assert read_pairs(f"parallel:{tsv}").pairs == [("Open", "Öffnen"), ("Close", "Schließen")]
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text('{"src": "Open", "tgt": "Öffnen"}\n{"src": "Close", "tgt": ""}\n{"src": "Quit", "tgt": "Beenden"}\n',
                     encoding="utf-8")
    corpus = read_pairs(f"parallel:{jsonl}")
    assert corpus.pairs == [("Open", "Öffnen"), ("Quit", "Beenden")] and corpus.skipped_empty == 1


@pytest.mark.parametrize("content, match", [("a\tb\tc\n", "2 TABs"), ("just text\n", "0 TABs")])
def test_bad_tsv(tmp_path, content, match):
    tsv = tmp_path / "p.tsv"
    tsv.write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match=match):
        read_pairs(f"parallel:{tsv}")


@pytest.mark.parametrize("line", ['{"src": "x"}', "not json", '["x", "y"]'])
def test_bad_jsonl(tmp_path, line):
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text(line + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"p\.jsonl:1"):
        read_pairs(f"parallel:{jsonl}")


@pytest.mark.parametrize("spec", ["parallel:", "parallel:only.txt", "parallel:a,b,c", "gettext:123"])
def test_bad_specs(tmp_path, spec):
    with pytest.raises(DataError):
        read_pairs(spec)


def test_read_mo(tmp_path):
    path = write_mo(tmp_path / "x.mo", [
        (b"File", "Datei".encode()),
        (b"menu\x04Open", "Öffnen".encode()),  # with a message context
        (b"%d file\x00%d files", "%d Datei\x00%d Dateien".encode()),  # a plural entry
        (b"Untranslated", b""),
    ])
    assert sorted(read_mo(path)) == sorted([("File", "Datei"), ("Open", "Öffnen"), ("%d file", "%d Datei")])


def test_read_mo_latin1_and_bad_file(tmp_path):
    path = write_mo(tmp_path / "l.mo", [(b"Close", "Schließen".encode("latin-1"))], charset="ISO-8859-1")
    assert read_mo(path) == [("Close", "Schließen")]
    bad = tmp_path / "bad.mo"
    bad.write_bytes(b"not a catalogue at all")
    with pytest.raises(DataError, match="not a .mo file"):
        read_mo(bad)


def test_gettext_source(tmp_path):
    root = tmp_path / "locale"
    write_mo(root / "de" / "LC_MESSAGES" / "a.mo", [(b"File", b"Datei"), (b"%s: %s", b"%s: %s")])
    write_mo(root / "de" / "LC_MESSAGES" / "b.mo", [(b"file", b"Akte"), (b"Quit", b"Beenden")])
    corpus = read_pairs(f"gettext:de:{root}")
    assert corpus.pairs == [("File", "Datei"), ("Quit", "Beenden")]  # a.mo first; "file" is a duplicate
    assert (corpus.format_only, corpus.duplicates) == (1, 1)
    with pytest.raises(DataError, match="no .mo catalogues"):
        read_pairs(f"gettext:fr:{root}")


def test_split_deterministic_by_content_and_disjoint():
    train, heldout, _ = split_pairs(SENTENCES)
    assert heldout and train
    assert len(train) + len(heldout) <= len(SENTENCES)
    # deterministic, and independent of the order of the pairs
    again = split_pairs(list(reversed(SENTENCES)))
    assert sorted(again[1]) == sorted(heldout) and sorted(again[0]) == sorted(train)
    held = {content_key(s) for pair in heldout for s in pair}
    assert not any(content_key(s) in held or content_key(t) in held for s, t in train)


def test_split_removes_train_pairs_that_share_a_heldout_sentence():
    _, heldout, _ = split_pairs(SENTENCES)
    src, tgt = heldout[0]
    pairs = SENTENCES + [("Another source entirely.", tgt.upper())]  # same target as a held-out pair
    train, heldout2, removed = split_pairs(pairs)
    assert removed >= 1 and ("Another source entirely.", tgt.upper()) not in train
    assert (src, tgt) in heldout2


def test_tiny_corpus_holds_out_one():
    train, heldout, _ = split_pairs([("a b", "c d"), ("e f", "g h")])
    assert len(heldout) == 1 and len(train) == 1


def test_prepare_and_load(tmp_path):
    src = write_lines(tmp_path / "a.en", [s for s, _ in SENTENCES])
    tgt = write_lines(tmp_path / "b.de", [t for _, t in SENTENCES])
    meta = prepare_parallel(f"parallel:{src},{tgt}", tmp_path / "out")
    assert meta["train_pairs"] + meta["heldout_pairs"] + meta["removed_overlapping_heldout"] == len(SENTENCES)
    assert json.loads((tmp_path / "out" / "meta.json").read_text())["format"] == "t2r-parallel"
    train, heldout = load_pairs(tmp_path / "out", "train"), load_pairs(tmp_path / "out", "heldout")
    assert len(train) == meta["train_pairs"] and len(heldout) == meta["heldout_pairs"]
    assert load_pairs(f"parallel:{src},{tgt}", "heldout") == heldout
    with pytest.raises(DataError, match="not parallel data"):
        load_pairs(tmp_path, "train")


def test_data_command_on_pairs(tmp_path, capsys):
    src = write_lines(tmp_path / "a.en", [s for s, _ in SENTENCES] + [""])
    tgt = write_lines(tmp_path / "b.de", [t for _, t in SENTENCES] + ["x"])
    assert main(["data", f"parallel:{src},{tgt}", "--out", str(tmp_path / "out"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["skipped_empty"] == 1 and result["train_pairs"] > 150


@pytest.mark.skipif(not list(Path(parallel.DEFAULT_LOCALE_DIR, "de", "LC_MESSAGES").glob("*.mo")),
                    reason="no German catalogues installed on this machine")
def test_installed_german_catalogues():
    corpus = read_pairs("gettext:de")
    assert len(corpus.pairs) > 1000
    assert all(s and t and not is_format_only(s) for s, t in corpus.pairs)


def test_hf_translation_dataset(monkeypatch):
    records = [{"translation": {"de": "Datei", "en": "File"}}, {"translation": {"de": "Fenster", "en": "Window"}},
               {"translation": {"de": "", "en": "Empty"}}]
    calls = []

    def load_dataset(name, config, split):
        calls.append((name, config, split))
        return records

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    corpus = read_pairs("parallel:hf:wmt14:de-en:validation:en-de")
    assert calls == [("wmt14", "de-en", "validation")]
    assert corpus.pairs == [("File", "Datei"), ("Window", "Fenster")] and corpus.skipped_empty == 1
    with pytest.raises(DataError, match="has no 'en' and 'fr' texts"):
        read_pairs("parallel:hf:wmt14:de-en:validation:en-fr")
    with pytest.raises(DataError, match="SRC-TGT"):
        read_pairs("parallel:hf:wmt14")


def test_hf_translation_dataset_without_datasets(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(DataError, match="pip install datasets"):
        read_pairs("parallel:hf:wmt14:de-en:validation:en-de")
