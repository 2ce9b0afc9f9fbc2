"""Every supported family, end to end on tiny random models with its quirks on (conftest.FAMILY_QUIRKS, and the
variants of test_adapters: sliding layers, rope scalings, LongRoPE's long factors): the RNN claim (full forward ==
quadratic == chunked prefill + token-by-token decode, left-padded == alone), converting only some layers
(`convert_layers`: Gemma 3's global layers), a cache that stops growing, save -> load in a new process with the same
logits (t2r.load and AutoModelForCausalLM after `import t2r`), and an unsupported architecture refused from its
config or GGUF header before any weights are read."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers

import t2r
from t2r.adapters import adapter_for, cache_bytes
from t2r.attention import LinearAttention
from t2r.errors import ModelSourceError, RecipeError, UnsupportedModelError
from t2r.sources import gguf_architecture, load_model, model_type_of, resolve
from test_adapters import VARIANTS, build
from test_cli import assert_usage_error, run_cli

RECIPES = {
    "linear": dict(feature_map="hedgehog", feature_dim=8),
    "window-kept": dict(feature_map="t2r", feature_dim=8, window=4, keep_softmax_layers=(1,)),
}
GEMMA = "gemma3_text-sliding"  # tiny Gemma 3: layers 0, 1 local (window 8), layer 2 global


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("variant", VARIANTS)
def test_rnn_claim_for_every_variant(variant, recipe):
    """80 tokens, so sliding layers (window 8), kept or converted, run well past their window."""
    model = t2r.convert(build(variant), **RECIPES[recipe])
    report = t2r.verify(model, tokens=80, prefill=37)
    assert report["ok"], report
    for key in ("max_rel_err_chunk_vs_quadratic", "max_rel_err_recurrent_vs_full", "max_rel_err_padded_vs_alone"):
        assert report[key] < 1e-4, (key, report[key])


@pytest.mark.parametrize("choice, kept", [("all", []), ("global", [0, 1]), ("2", [0, 1]), ("0,2", [1]), ([1], [0, 2])])
def test_convert_layers_picks_the_layers_and_records_the_rest(choice, kept):
    model = t2r.convert(build(GEMMA), feature_map="hedgehog", feature_dim=8, convert_layers=choice)
    assert model.config.t2r["keep_softmax_layers"] == kept
    layers = adapter_for(model).decoder_layers(model)
    assert [i for i, layer in enumerate(layers) if not isinstance(layer.self_attn, LinearAttention)] == kept
    assert t2r.verify(model, tokens=40, prefill=21)["ok"]


@pytest.mark.parametrize("kwargs, words", [
    (dict(convert_layers="7"), "out of range"),
    (dict(convert_layers="x"), "all, global or layer indices"),
    (dict(convert_layers="global", keep_softmax_layers=(2,)), "leaves no layer"),
])
def test_convert_layers_refuses_what_it_cannot_do(kwargs, words):
    model = build(GEMMA)
    with pytest.raises(RecipeError, match=words):
        t2r.convert(model, **kwargs)
    assert not any(isinstance(m, LinearAttention) for m in model.modules())
    with pytest.raises(RecipeError, match="leaves no layer"):  # every layer of a sliding Mistral is local
        t2r.convert(build("mistral-sliding"), convert_layers="global")


@pytest.mark.parametrize("choice", ["global", "all"])
def test_the_cache_stops_growing(choice):
    """Global layers hold a fixed recurrent state, kept local layers their window (8) - 1 slots from the first token
    on: the cache holds as many bytes after 3 tokens as after 20 and 60."""
    model = t2r.convert(build(GEMMA), feature_map="hedgehog", feature_dim=8, convert_layers=choice)
    ids = torch.randint(3, 300, (1, 60), generator=torch.Generator().manual_seed(0))
    sizes = {}
    for n in (3, 20, 60):
        cache = t2r.new_cache(model)
        with torch.no_grad():
            model(input_ids=ids[:, :n], cache=cache, use_cache=True)
        sizes[n] = cache_bytes(cache)
    assert sizes[3] == sizes[20] == sizes[60] > 0


def test_generate_decodes_with_kept_local_layers(tokenizer):
    model = t2r.convert(build(GEMMA), feature_map="hedgehog", feature_dim=8, convert_layers="global")
    result = t2r.generate(model, tokenizer, ["a much longer prompt than the window", "short"], max_new_tokens=12)
    assert result.new_tokens == 12 and len(result.texts) == 2


def test_reordering_moves_the_fixed_windows_with_their_rows():
    """After a prefill of two different rows, swapping the rows of the cache (what beam search does every step) and
    decoding the swapped next tokens gives each row's logits as if it had been read in that order from the start."""
    model = t2r.convert(build(GEMMA), feature_map="hedgehog", feature_dim=8, convert_layers="global").eval()
    ids = torch.randint(3, 300, (2, 30), generator=torch.Generator().manual_seed(1))
    nxt = torch.randint(3, 300, (2, 1), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        cache = t2r.new_cache(model)
        model(input_ids=ids, cache=cache, use_cache=True)
        cache.reorder_cache(torch.tensor([1, 0]))
        stepped = model(input_ids=nxt.flip(0), cache=cache, use_cache=True).logits[:, -1]
        whole = model(input_ids=torch.cat([ids.flip(0), nxt.flip(0)], dim=1)).logits[:, -1]
    torch.testing.assert_close(stepped, whole, rtol=1e-4, atol=1e-4)


def test_beam_search_reorders_the_fixed_windows(tokenizer):
    """Beam search over kept local layers (fixed-size window slots, reordered with the beams) and converted global
    ones picks the same beams as beam search that recomputes the whole sequence at every step (no cache)."""
    model = t2r.convert(build(GEMMA), feature_map="hedgehog", feature_dim=8, convert_layers="global").eval()
    enc = tokenizer(["a prompt longer than the window of eight", "short"], return_tensors="pt", padding=True)
    kw = dict(num_beams=3, max_new_tokens=10, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        cached = model.generate(**enc, **kw)
        recomputed = model.generate(**enc, use_cache=False, **kw)
    assert torch.equal(cached, recomputed)


LOAD_AND_SCORE = """
import json, sys, torch, t2r
from transformers import AutoModelForCausalLM
out = {}
for name, path in json.loads(sys.argv[1]).items():
    ids = torch.tensor(json.loads(sys.argv[2]))
    loaded, auto = t2r.load(path), AutoModelForCausalLM.from_pretrained(path).eval()
    with torch.no_grad():
        a, b = loaded(input_ids=ids).logits, auto(input_ids=ids).logits
    out[name] = {"load": a.tolist(), "auto": b.tolist(), "class": type(auto).__name__}
print(json.dumps(out))
"""


def test_save_then_load_in_a_new_process_gives_the_same_logits(tmp_path):
    """One subprocess loads every family's saved model twice: with t2r.load, and with AutoModelForCausalLM after
    `import t2r` (no trust_remote_code)."""
    ids = torch.randint(3, 300, (1, 12), generator=torch.Generator().manual_seed(3))
    paths, expected = {}, {}
    for variant in VARIANTS:
        model = t2r.convert(build(variant), feature_map="hedgehog", feature_dim=8, window=4,
                            convert_layers="global" if variant == GEMMA else "all")
        paths[variant] = str(tmp_path / variant)
        t2r.save(model, paths[variant])
        with torch.no_grad():
            expected[variant] = (model(input_ids=ids).logits, type(model).__name__)
    env = {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-c", LOAD_AND_SCORE, json.dumps(paths), json.dumps(ids.tolist())],
                          capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    for variant, (logits, class_name) in expected.items():
        assert got[variant]["class"] == class_name
        for how in ("load", "auto"):
            torch.testing.assert_close(torch.tensor(got[variant][how]), logits, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------- refused before any weights load


def _gguf_header(architecture: str, path: Path, garbage: bytes = b"\x00" * 64) -> Path:
    """A GGUF v3 header: a uint32 and an array before `general.architecture` (skipped), then garbage for weights."""
    def string(s: str) -> bytes:
        return struct.pack("<Q", len(s)) + s.encode()

    kvs = [string("general.alignment") + struct.pack("<II", 4, 32),
           string("x.list") + struct.pack("<IIQ", 9, 8, 2) + string("ab") + string("c"),
           string("general.architecture") + struct.pack("<I", 8) + string(architecture)]
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, len(kvs)) + b"".join(kvs) + garbage)
    return path


@pytest.fixture
def no_weights_loaded(monkeypatch):
    """Loading weights (or a tokenizer) fails the test: a refusal must come before."""
    def forbidden(*args, **kwargs):
        raise AssertionError("weights were loaded before the architecture was checked")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", forbidden)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", forbidden)


def test_the_light_family_list_names_exactly_the_adapters():
    """`t2r.families` (checked before torch is imported) and the adapters' own declarations agree."""
    from t2r import families
    from t2r.adapters import ADAPTERS

    assert sorted(families.MODEL_TYPES) == sorted(ADAPTERS.names())
    declared = {arch: model_type for name in ADAPTERS.names()
                for arch, model_type in ADAPTERS.get(name).gguf_architectures.items()}
    assert declared == families.GGUF_ARCHITECTURES


def test_gguf_architecture_reads_the_header_only(tmp_path):
    assert gguf_architecture(_gguf_header("gemma3", tmp_path / "g.gguf")) == "gemma3"
    assert model_type_of(resolve(str(_gguf_header("gemma3", tmp_path / "h.gguf")))) == "gemma3_text"
    (tmp_path / "bad.gguf").write_bytes(b"GGML" + b"\x00" * 40)
    with pytest.raises(ModelSourceError, match="could not load model .*not a GGUF"):
        gguf_architecture(tmp_path / "bad.gguf")


@pytest.mark.parametrize("kind", ["gguf", "dir"])
def test_unsupported_architecture_is_refused_before_loading(tmp_path, no_weights_loaded, kind):
    if kind == "gguf":
        spec = _gguf_header("bloom", tmp_path / "bloom.gguf")
    else:
        spec = tmp_path / "opt"
        spec.mkdir()
        (spec / "config.json").write_text(json.dumps({"model_type": "opt"}))
        (spec / "model.safetensors").write_bytes(b"not weights")
    with pytest.raises(UnsupportedModelError, match="model type '(bloom|opt)'.*supported: bart, gemma3_text, gpt2, llama, marian"):
        load_model(str(spec))


def test_the_refusal_comes_before_torch_is_imported(tmp_path):
    """`t2r convert` on a GGUF of an unknown family answers from its header in a process that never imports torch
    or transformers (what makes it take well under a second; benchmarks/cli_startup.py --refusal times it)."""
    spec = _gguf_header("bloom", tmp_path / "bloom.gguf", garbage=b"\x00" * (1 << 20))
    code = ("import sys; from t2r.cli.app import main; rc = main(['convert', sys.argv[1], '--out', sys.argv[2]]); "
            "print(rc, 'torch' in sys.modules, 'transformers' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code, str(spec), str(tmp_path / "out")], capture_output=True,
                          text=True, timeout=120)
    assert done.stdout.split() == ["2", "False", "False"], done.stderr
    assert "no t2r adapter for model type 'bloom'" in done.stderr and not (tmp_path / "out").exists()


def test_cli_refuses_an_unsupported_gguf_in_one_line(capsys, tmp_path, no_weights_loaded):
    spec = _gguf_header("bloom", tmp_path / "bloom.gguf", garbage=b"\x00" * (1 << 20))
    code, _, err = run_cli(capsys, "convert", spec, "--out", tmp_path / "out")
    assert_usage_error(code, err, "convert", "model type 'bloom'", "supported:", "gemma3_text", "phi3", "qwen3")
    assert not (tmp_path / "out").exists()

