"""Continuous batching for a converted model: many prompts of mixed lengths decoded as one batch whose rows join
when a slot frees up and leave when they finish.

Every row's state has the same fixed size whatever its length, so a row joins by concatenating its state to the
batch's along dim 0 and leaves by indexing it out; the memory of N streams is N times one state, known before the
first token. A joining prompt is prefilled alone (batch 1, chunked, carrying its state), then decodes with the others,
each row at its own position. Greedy; each row gets the tokens it would get decoded alone.

    outputs = serve(model, [ids_a, ids_b, ...], max_new_tokens=[32, 8, ...], max_batch=16, eos_token_id=2)
    outputs[i]: the new tokens of prompt i ([n_i] long), stopping after an EOS
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from .adapters import RecurrentCache, RecurrentLayer
from .errors import T2RError
from .generate import new_cache
from .step import StateStep, flatten_states, group_states, has_state_step, state_layout


def cache_step(model, layout) -> Callable:
    """A step with `StateStep`'s signature through the model's own forward (any converted family): the states go
    into a fresh `RecurrentCache` and come out of it."""

    def step(input_ids: torch.Tensor, position_ids: torch.Tensor, *state: torch.Tensor):
        cache = RecurrentCache(len(layout))
        for layer, s in zip(cache.layers, group_states(state, layout)):
            layer.state = s
        logits = model(input_ids=input_ids, position_ids=position_ids, cache=cache, use_cache=True,
                       logits_to_keep=1).logits[:, -1]  # (B, V)
        return (logits, *flatten_states(cache))

    return step


def default_step(model, layout) -> Callable:
    """`StateStep` where the family has one (fewer Python calls per token), else `cache_step`."""
    return StateStep(model, layout) if has_state_step(model) else cache_step(model, layout)


@dataclass
class Row:
    request: int                 # index into the prompts
    position: int                # position of the row's next input token
    budget: int                  # tokens it may still generate
    tokens: list[int] = field(default_factory=list)


def _check(model, prompts, max_new_tokens, max_batch) -> list[int]:
    if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
        raise T2RError(f"max_batch must be an int >= 1, got {max_batch!r}")
    budgets = [max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int) else list(max_new_tokens)
    if len(budgets) != len(prompts) or any(b < 0 for b in budgets):
        raise T2RError("max_new_tokens must be one int >= 0 or one per prompt")
    if any(p.dim() != 1 or p.numel() == 0 for p in prompts):
        raise T2RError("each prompt must be a non-empty 1-D tensor of token ids")
    return budgets


@torch.inference_mode()
def prefill_row(model, prompt: torch.Tensor, chunk: int | None) -> tuple[int, list[torch.Tensor], list]:
    """(first greedy token, flat state, layout) of one prompt, prefilled alone in pieces of `chunk` tokens."""
    cache = new_cache(model)
    if any(not isinstance(layer, RecurrentLayer) for layer in cache.layers):
        raise T2RError("continuous batching needs a model whose every layer is linear (a kept softmax layer's KV "
                       "cache grows with each row's length)")
    ids = prompt[None]  # (1, T)
    for piece in ids.split(chunk or ids.shape[1], dim=1):
        logits = model(input_ids=piece, cache=cache, use_cache=True, logits_to_keep=1).logits[:, -1]  # (1, V)
    return int(logits.argmax(-1)), flatten_states(cache), state_layout(cache)


@torch.inference_mode()
def serve(model, prompts: Sequence[torch.Tensor], *, max_new_tokens: int | Sequence[int], max_batch: int = 16,
          eos_token_id: int | None = None, prefill_chunk: int | None = None, step_for=default_step,
          on_step: Callable[[int], None] | None = None) -> list[torch.Tensor]:
    """Greedy continuations of `prompts` (1-D token tensors), at most `max_batch` decoded at once.

    Rows join in prompt order as slots free up. `step_for(model, layout)` builds the batched one-token step
    (`default_step`; a compiled `StateStep` works too). `on_step(batch_size)` is called after every batched step
    (for measurements). Returns one [n_i] long tensor per prompt."""
    budgets = _check(model, prompts, max_new_tokens, max_batch)
    waiting, done = deque(range(len(prompts))), [[] for _ in prompts]
    rows: list[Row] = []
    state: list[torch.Tensor] = []
    step = None
    while waiting or rows:
        while waiting and len(rows) < max_batch:  # join
            i = waiting.popleft()
            if budgets[i] == 0:
                continue
            first, row_state, row_layout = prefill_row(model, prompts[i], prefill_chunk)
            row = Row(i, prompts[i].numel(), budgets[i] - 1, [first])
            if row.budget == 0 or first == eos_token_id:
                done[i] = row.tokens
                continue
            if step is None:
                step = step_for(model, row_layout)
            rows.append(row)
            state = row_state if len(rows) == 1 else [torch.cat([a, b]) for a, b in zip(state, row_state)]
        if not rows:
            continue
        device = state[0].device
        ids = torch.tensor([[r.tokens[-1]] for r in rows], device=device)  # (N, 1)
        pos = torch.tensor([[r.position] for r in rows], device=device)  # (N, 1)
        logits, *state = step(ids, pos, *state)
        if on_step is not None:
            on_step(len(rows))
        keep = []
        for j, (row, token) in enumerate(zip(rows, logits.argmax(-1).tolist())):
            row.tokens.append(token)
            row.position += 1
            row.budget -= 1
            if row.budget == 0 or token == eos_token_id:  # leave
                done[row.request] = row.tokens
            else:
                keep.append(j)
        if len(keep) < len(rows):
            index = torch.tensor(keep, dtype=torch.long, device=device)
            rows = [rows[j] for j in keep]
            state = [t.index_select(0, index) for t in state]
    return [torch.tensor(t, dtype=torch.long) for t in done]
