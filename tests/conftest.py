"""Shared fixtures: tiny random models of every supported family (built in the test, torchtune-style), a byte-level
tokenizer, and a saved tiny model directory. Nothing here touches the network."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # a hub id must fail at once, never hang
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch
import transformers
import yaml

FAMILIES = ("llama", "mistral", "qwen2", "gpt2", "qwen3", "phi3", "olmo2", "gemma3_text")
SLIDING = ["sliding_attention", "sliding_attention", "full_attention"]  # Gemma 3's local, local, global pattern


@pytest.fixture(autouse=True)
def _private_eval_cache(tmp_path_factory, monkeypatch):
    """Remembered evaluations (t2r.evaluate.cached_perplexity) go to a folder of the test session, not ~/.cache."""
    import t2r.evaluate

    folder = tmp_path_factory.getbasetemp() / "evals"  # shared: entries are keyed by weights and tokens
    monkeypatch.setattr(t2r.evaluate, "eval_cache_dir", lambda: folder)


def tiny_config(family: str, vocab_size: int = 300, **overrides):
    common = dict(vocab_size=vocab_size, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if family == "gpt2":
        kw = dict(n_embd=64, n_layer=3, n_head=4, n_positions=512, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        return transformers.GPT2Config(**{**common, **kw, **overrides})
    kw = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=512)
    cls = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
           "qwen2": transformers.Qwen2Config, "qwen3": transformers.Qwen3Config, "phi3": transformers.Phi3Config,
           "olmo2": transformers.Olmo2Config, "gemma3_text": transformers.Gemma3TextConfig}[family]
    kw.update(FAMILY_QUIRKS.get(family, {}))
    return cls(**{**common, **kw, **overrides})


def longrope(original_max: int, rotary_dims: int = 8) -> dict:
    """Phi-3 config fields for LongRoPE ("su") on `rotary_dims` of the 16 head dims: short factors up to
    `original_max` positions, long ones beyond."""
    half = rotary_dims // 2
    return dict(original_max_position_embeddings=original_max,
                rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": rotary_dims / 16,
                                 "short_factor": [1.0 + 0.1 * i for i in range(half)],
                                 "long_factor": [2.0 + 0.5 * i for i in range(half)]})


# Each family's quirks, on by default in its tiny model: Qwen3 per-head q/k norms (no qkv bias), Phi-3 a fused qkv and
# gate-up, LongRoPE on half of the head dims, OLMo 2 norms on the whole q/k projections and after each block, Gemma 3
# one KV head, local (window 8) and global layers with their own rotary bases, query_pre_attn_scalar != head_dim.
FAMILY_QUIRKS = {
    "mistral": dict(sliding_window=None),
    "qwen3": dict(head_dim=16),
    "phi3": dict(num_key_value_heads=2, **longrope(256), sliding_window=None,
                 resid_pdrop=0.0, embd_pdrop=0.0, attention_dropout=0.0),
    "olmo2": dict(),
    "gemma3_text": dict(num_key_value_heads=1, head_dim=32, query_pre_attn_scalar=24, sliding_window=8,
                        layer_types=SLIDING,
                        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                         "full_attention": {"rope_type": "linear", "factor": 2.0,
                                                            "rope_theta": 1000000.0}}),
}


def tiny_model(family: str = "llama", seed: int = 0, **overrides):
    torch.manual_seed(seed)
    config = tiny_config(family, **overrides)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def byte_tokenizer():
    """A byte-level BPE tokenizer with no merges: 256 byte tokens + <pad>, <s>, </s> (ids 0, 1, 2)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2}
    for ch in sorted(alphabet):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                                eos_token="</s>")


@pytest.fixture(scope="session")
def tokenizer():
    return byte_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer):
    """A saved, unconverted tiny Llama (GQA) with the byte tokenizer: what a user's local HF directory looks like."""
    path = tmp_path_factory.mktemp("models") / "tiny-llama"
    model = tiny_model("llama", vocab_size=len(tokenizer))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_converted_dir(tmp_path_factory, tiny_model_dir, tokenizer):
    """The tiny Llama converted (t2r map, window 4, layer 1 kept softmax) and saved with t2r.save."""
    import t2r

    model = t2r.convert(transformers.AutoModelForCausalLM.from_pretrained(tiny_model_dir), feature_map="t2r",
                        feature_dim=8, window=4, keep_softmax_layers=(1,))
    path = tmp_path_factory.mktemp("converted") / "tiny-rnn"
    t2r.save(model, path, tokenizer)
    return path


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """Tiny models gain nothing from threads, and on a shared 2-core machine contention makes timings erratic."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


PRIDE = ("It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in "
         "want of a wife. However little known the feelings or views of such a man may be on his first entering a "
         "neighbourhood, this truth is so well fixed in the minds of the surrounding families. ") * 12


def write_tiny_recipe(folder, model, **finetune):
    """folder/tiny.yaml: a pipeline recipe on `model` that runs in seconds (hedgehog + a 4-token window, 3 attention
    transfer steps, one layer kept softmax, 2 LoRA + KD finetune steps; `finetune` overrides those) on PRIDE, written to
    folder/text.txt."""
    (folder / "text.txt").write_text(PRIDE)
    recipe = {
        "name": "tiny", "model": str(model), "data": str(folder / "text.txt"), "block_size": 64,
        "convert": {"feature_map": "hedgehog", "feature_dim": 8, "window": 4},
        "distill": {"steps": 3, "lr": 0.01, "eval_every": 0},
        "keep_softmax": "auto:1",
        "finetune": {"steps": 2, "lora": 2, "kd": 0.5, "eval_every": 0, **finetune},
        "eval": {"data": [str(folder / "text.txt")], "context": 64, "max_blocks": 2},
        "generate": {"prompt": "It is", "max_new_tokens": 4},
    }
    path = folder / "tiny.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path
