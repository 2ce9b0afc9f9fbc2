"""Generation: chunked prefill, then one recurrent step per token, through HF `generate()` and our state cache."""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass

import torch
from transformers import DynamicCache

from .adapters import RecurrentCache, adapter_for, cache_bytes, is_converted
from .errors import T2RError
from .rng import seeded as seeded_rng


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen: greedy (the default), or sampled after HF's warpers (temperature, then top_k,
    0 = off, then top_p). A sampled run is reproducible from `seed` and leaves the caller's RNG state as it was (None:
    draw from torch's global RNG as it stands)."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = 0

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise T2RError(f"temperature must be > 0, got {self.temperature!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise T2RError(f"top_k must be an int >= 0 (0 = off), got {self.top_k!r}")
        if not 0 < self.top_p <= 1:
            raise T2RError(f"top_p must be in (0, 1], got {self.top_p!r}")

    def generator(self, device: torch.device) -> torch.Generator | None:
        """A generator on `device` seeded by `seed` (None without a seed, or when nothing is sampled)."""
        if not self.do_sample or self.seed is None:
            return None
        return torch.Generator(device=device).manual_seed(self.seed)

    def hf_options(self) -> dict:
        """The keyword arguments of HF `generate()` for this choice."""
        if not self.do_sample:
            return dict(do_sample=False, temperature=None, top_p=None, top_k=None)
        return dict(do_sample=True, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k)


GREEDY = Sampling()


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


def check_positions(model, length: int, what: str, advice: str) -> None:
    """Refuse `length` tokens on a model with learned absolute positions (GPT-2's n_positions) that has fewer; rotary
    models have no such limit (they read past their trained context, less well)."""
    limit = adapter_for(model).max_positions(model.config)
    if limit is not None and length > limit:
        raise T2RError(f"{what} needs {length} positions but this model has {limit} learned position embeddings: "
                       f"{advice}")


def new_cache(model):
    """A fresh cache for `model`: the fixed-size recurrent cache for a converted model, HF's KV cache otherwise."""
    if is_converted(model):
        kept, adapter = tuple(model.config.t2r.get("keep_softmax_layers", ())), adapter_for(model)
        return RecurrentCache(len(adapter.decoder_layers(model)), kept, adapter.layer_windows(model.config))
    return DynamicCache(config=model.config)


def prepare_tokenizer(tokenizer):
    """Left padding (so every row ends at its last real token) and a pad token."""
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


@torch.inference_mode()
def generate(model, tokenizer, prompts: str | list[str], *, max_new_tokens: int = 64, sampling: Sampling = GREEDY,
             stopping_criteria=None, streamer=None) -> GenerationResult:
    """Generate continuations of one prompt or a batch (left-padded), greedy or sampled (see `Sampling`)."""
    single = isinstance(prompts, str)
    prompts = [prompts] if single else list(prompts)
    prepare_tokenizer(tokenizer)
    device = next(model.parameters()).device
    enc = tokenizer(prompts, return_tensors="pt", padding=True).to(device)
    empty = [i for i, n in enumerate(enc["attention_mask"].sum(-1).tolist()) if n == 0] if enc["input_ids"].numel() \
        else list(range(len(prompts)))
    if empty:
        what = "the prompt" if single else f"prompt {empty[0]}"
        raise T2RError(f"{what} is empty (no tokens): give some text to continue")
    check_positions(model, enc["input_ids"].shape[1] + max_new_tokens, "the prompt plus the new tokens",
                    "shorten the prompt or ask for fewer new tokens")
    cache = new_cache(model)
    seeded = sampling.do_sample and sampling.seed is not None
    start = time.perf_counter()
    with seeded_rng(sampling.seed, device) if seeded else nullcontext():
        out = model.generate(**enc, cache=cache, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                             stopping_criteria=stopping_criteria, streamer=streamer, **sampling.hf_options())
    seconds = time.perf_counter() - start
    new = out[:, enc["input_ids"].shape[1]:]
    texts = tokenizer.batch_decode(new, skip_special_tokens=True)
    return GenerationResult(texts=texts, prompt_tokens=int(enc["input_ids"].shape[1]), new_tokens=int(new.shape[1]),
                            seconds=seconds, tokens_per_s=new.numel() / max(seconds, 1e-9),
                            state_bytes=cache_bytes(cache))
