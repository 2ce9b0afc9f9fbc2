"""Generation: chunked prefill, then one recurrent step per token, through HF `generate()` and our state cache."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch

from .adapters import RecurrentCache, adapter_for, cache_bytes, is_converted


@dataclass
class GenerationResult:
    texts: list[str]          # generated continuations (prompt excluded), one per prompt
    prompt_tokens: int        # longest prompt, in tokens
    new_tokens: int           # tokens generated per row (the longest row)
    seconds: float            # wall time of prefill + decode
    tokens_per_s: float       # new_tokens * batch / seconds
    state_bytes: int          # recurrent state (converted) or KV cache (original) after generation

    def to_dict(self) -> dict:
        return asdict(self)


def new_cache(model):
    """A fresh cache for `model`: the fixed-size recurrent cache for a converted model, HF's KV cache otherwise."""
    if is_converted(model):
        kept = tuple(model.config.t2r.get("keep_softmax_layers", ()))
        return RecurrentCache(len(adapter_for(model).decoder_layers(model)), kept)
    from transformers import DynamicCache

    return DynamicCache(config=model.config)


def prepare_tokenizer(tokenizer):
    """Left padding (so every row ends at its last real token) and a pad token."""
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


@torch.inference_mode()
def generate(model, tokenizer, prompts: str | list[str], *, max_new_tokens: int = 64, do_sample: bool = False,
             temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, seed: int | None = 0,
             stopping_criteria=None, streamer=None) -> GenerationResult:
    """Generate continuations of one prompt or a batch (left-padded), greedy or sampled."""
    single = isinstance(prompts, str)
    prompts = [prompts] if single else list(prompts)
    prepare_tokenizer(tokenizer)
    enc = tokenizer(prompts, return_tensors="pt", padding=True).to(next(model.parameters()).device)
    if seed is not None:
        torch.manual_seed(seed)
    cache = new_cache(model)
    sampling = dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=top_k) if do_sample else dict(
        do_sample=False, temperature=None, top_p=None, top_k=None)
    start = time.perf_counter()
    out = model.generate(**enc, cache=cache, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                         stopping_criteria=stopping_criteria, streamer=streamer, **sampling)
    seconds = time.perf_counter() - start
    new = out[:, enc["input_ids"].shape[1]:]
    texts = tokenizer.batch_decode(new, skip_special_tokens=True)
    return GenerationResult(texts=texts, prompt_tokens=int(enc["input_ids"].shape[1]), new_tokens=int(new.shape[1]),
                            seconds=seconds, tokens_per_s=new.numel() / max(seconds, 1e-9),
                            state_bytes=cache_bytes(cache))
