"""A lean decode loop: one prefill forward, then one forward per token with the cache, nothing else.

HF `generate()` spends a few milliseconds per token outside the model (input preparation, mask bookkeeping, logits
processors, stopping criteria, `torch.cat` of the growing sequence). That overhead is the same for any model, so it
hides what a recurrent state buys. `decode` keeps HF's semantics for the options it takes (greedy, temperature, top-k,
top-p, per-row EOS with padding after it, left padding through position ids = cumsum(mask) - 1) and gives the same
tokens as `model.generate(...)`; it applies none of a model's `generation_config` defaults (repetition penalty, ...).

    tokens, cache = decode(model, ids, mask, max_new_tokens=32)           # tokens: [B, new]
    tokens, cache = decode(model, ids, mask, max_new_tokens=32, sampling=Sampling(do_sample=True, top_p=0.9, seed=1))
    for next_tokens in iter_decode(model, ids, cache=cache, max_new_tokens=8): ...   # one [B] tensor per step

Many prompts whose rows join and leave one batch (continuous batching): `t2r.batching.serve`. A compiled step:
`decode(t2r.step.compiled_decoder(model).model, ...)`.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from .errors import T2RError
from .generate import GREEDY, Sampling, new_cache


def positions_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """HF's position ids for a left-padded batch: cumsum(mask) - 1, padding at 0. mask: [B, L] -> [B, L]."""
    return (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)


def process_logits(logits: torch.Tensor, *, temperature: float = 1.0, top_k: int = 0,
                   top_p: float = 1.0) -> torch.Tensor:
    """HF's sampling warpers in HF's order (temperature, top-k, top-p); removed tokens get -inf. logits: [B, V]."""
    scores = logits.float()  # (B, V)
    if temperature != 1.0:
        scores = scores / temperature
    if top_k and top_k < scores.shape[-1]:
        kth = torch.topk(scores, top_k, dim=-1).values[:, -1:]  # (B, 1)
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=False)  # (B, V)
        cumulative = sorted_scores.softmax(-1).cumsum(-1)  # (B, V)
        remove = cumulative <= (1 - top_p)
        remove[:, -1] = False  # keep at least the most likely token
        scores = scores.masked_fill(remove.scatter(1, order, remove), float("-inf"))
    return scores


def _check_options(max_new_tokens: int, prefill_chunk: int | None) -> None:
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise T2RError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    if prefill_chunk is not None and prefill_chunk < 1:
        raise T2RError(f"prefill_chunk must be >= 1 (or None: one forward), got {prefill_chunk!r}")


def _eos_ids(eos_token_id, device) -> torch.Tensor | None:
    if eos_token_id is None:
        return None
    ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    return torch.tensor(ids, dtype=torch.long, device=device) if ids else None


@torch.inference_mode()
def iter_decode(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *, cache,
                max_new_tokens: int, sampling: Sampling = GREEDY, eos_token_id: int | list[int] | None = None,
                pad_token_id: int | None = None, stopping_criteria=None,
                prefill_chunk: int | None = None) -> Iterator[torch.Tensor]:
    """Yield the next tokens ([B] long) one step at a time; see `decode` for the arguments.

    `cache` is required here (it is advanced in place). If it already holds P tokens, `input_ids` continue them and
    `attention_mask`, when given, covers all P + T tokens (as in HF)."""
    _check_options(max_new_tokens, prefill_chunk)
    B, T = input_ids.shape
    device = input_ids.device
    past = cache.get_seq_length() if cache is not None else 0
    if attention_mask is not None and attention_mask.shape != (B, past + T):
        raise T2RError(f"attention_mask must be [B, past + T] = [{B}, {past + T}] (the cache holds {past} tokens), "
                       f"got {list(attention_mask.shape)}")
    eos = _eos_ids(eos_token_id, device)
    pad = pad_token_id if pad_token_id is not None else (None if eos is None else int(eos[0]))
    needs_mask = attention_mask is not None and not bool(attention_mask.all())
    if needs_mask:  # preallocated, so a step slices instead of concatenating
        mask = torch.ones(B, past + T + max_new_tokens, dtype=attention_mask.dtype, device=device)  # (B, L)
        mask[:, :past + T] = attention_mask
        pos = positions_from_mask(attention_mask)[:, past:]  # (B, T)
    else:
        mask = None
        pos = torch.arange(past, past + T, device=device).expand(B, T)  # (B, T)
    unfinished = torch.ones(B, dtype=torch.bool, device=device)
    sequence = input_ids  # only kept when a stopping criterion needs to see it
    generator = sampling.generator(device)
    if max_new_tokens == 0:
        return
    step = prefill_chunk or T
    for start in range(0, T - step, step):  # all but the last piece of a long prompt: only the cache matters
        end = start + step
        model(input_ids=input_ids[:, start:end], attention_mask=None if mask is None else mask[:, :past + end],
              position_ids=pos[:, start:end], cache=cache, use_cache=True, logits_to_keep=1)
    start = (T - 1) // step * step
    step_ids, pos, length = input_ids[:, start:], pos[:, start:], past + T
    for _ in range(max_new_tokens):
        out = model(input_ids=step_ids, attention_mask=None if mask is None else mask[:, :length], position_ids=pos,
                    cache=cache, use_cache=True, logits_to_keep=1)
        logits = out.logits[:, -1].float()  # (B, V)
        if sampling.do_sample:
            scores = process_logits(logits, temperature=sampling.temperature, top_k=sampling.top_k,
                                    top_p=sampling.top_p)
            next_tokens = torch.multinomial(scores.softmax(-1), 1, generator=generator).squeeze(1)  # (B,)
        else:
            scores = logits
            next_tokens = logits.argmax(-1)  # (B,)
        if eos is not None:
            next_tokens = torch.where(unfinished, next_tokens, pad)
            unfinished &= ~torch.isin(next_tokens, eos)
        if stopping_criteria is not None:
            sequence = torch.cat([sequence, next_tokens[:, None]], 1)
            unfinished &= ~torch.as_tensor(stopping_criteria(sequence, scores), device=device).bool()
        yield next_tokens
        if not bool(unfinished.any()):
            return
        step_ids, pos, length = next_tokens[:, None], pos[:, -1:] + 1, length + 1


def decode(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *, max_new_tokens: int,
           sampling: Sampling = GREEDY, eos_token_id: int | list[int] | None = None, pad_token_id: int | None = None,
           stopping_criteria=None, cache=None, prefill_chunk: int | None = None):
    """Generate up to `max_new_tokens` tokens after `input_ids` ([B, T], left-padded per `attention_mask`).

    One prefill forward over the prompt (the chunked form for a converted model), or one per `prefill_chunk` tokens
    carrying the cache (a bounded working set: a long prompt then costs time linear in its length for a converted
    model), then one forward per token with `logits_to_keep=1`. Greedy unless `sampling.do_sample`; sampling applies
    temperature, top_k (0 = off) and top_p as HF does and draws from a generator seeded by `sampling.seed` (None:
    torch's global RNG). A row that emits one of `eos_token_id` (None: no EOS stopping) is filled with
    `pad_token_id` (default: the first EOS id) afterwards; generation stops early when every row has stopped, or
    when `stopping_criteria(sequence, scores)` (HF's `StoppingCriteriaList` works) is true for every row.

    Returns (tokens [B, new] long, cache); `cache` defaults to `t2r.generate.new_cache(model)`."""

    cache = new_cache(model) if cache is None else cache
    steps = list(iter_decode(model, input_ids, attention_mask, cache=cache, max_new_tokens=max_new_tokens,
                             sampling=sampling, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
                             stopping_criteria=stopping_criteria, prefill_chunk=prefill_chunk))
    if not steps:
        return input_ids.new_zeros(input_ids.shape[0], 0), cache
    return torch.stack(steps, 1), cache  # (B, new)
