"""Synthetic recall of any HF causal LM (converted or not): passkey retrieval and multi-query associative recall,
generated locally from a seed (the tasks: `t2r.recall_tasks`), scored two ways per query:

    log-likelihood  the right answer's total log-probability (of its tokens, given everything before it) against
                    `distractors` wrong answers of the same form; correct iff it scores highest. A tie at the top
                    earns 1 / (tied answers) when the right one is among them (the expected score of breaking the
                    tie at random), so a model that cannot tell them apart scores chance, 1 / (distractors + 1).
    generation      greedy decoding of up to `generate_tokens` tokens; correct iff the text, stripped of spaces,
                    starts with the answer.

The context is computed once per sample (in pieces of PREFILL_CHUNK tokens carrying the cache); each group of
candidate answers then runs on a copy of that cache repeated per candidate, and greedy decoding continues the cache.

    settings = RecallSettings(task="passkey", lengths=(1024, 4096), depths=(0.0, 0.5, 1.0), samples=20)
    result = run_recall(model, tokenizer, settings)   # JSON-able: {"task", "chance", "settings", "cells": [...]}
    plot_recall({"teacher": r1, "student": r2}, "recall.png")
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from .adapters import cache_bytes
from .bench import copy_cache
from .errors import T2RError
from .generate import new_cache
from .recall_tasks import (  # noqa: F401  (re-exported: the public API of recall)
    RECALL_TASKS,
    Query,
    RecallSample,
    RecallSettings,
    mqar_sample,
    parse_depths,
    parse_lengths,
    parse_pairs,
    passkey_sample,
)

log = logging.getLogger(__name__)

PREFILL_CHUNK = 2048  # tokens per forward while reading a context
COPY_BUDGET_BYTES = 2 * 2**30  # cache copies alive at once while scoring candidates
TAIL_CHARS = 64  # text before a continuation that is tokenized with it
TIE_TOLERANCE = 1e-6  # relative: log-likelihoods this close count as a tie
MODELS = {"teacher": "original", "student": "converted"}  # result key -> label


def continuation_ids(tokenizer, before: str, text: str) -> list[int]:
    """Tokens of `text` as they follow `before`: those of (tail of `before` + text) past the tail's own, as lm-eval
    splits a continuation; the plain tokens of `text` where the tail would tokenize differently."""
    tail = before[-TAIL_CHARS:]
    head = tokenizer.encode(tail, add_special_tokens=False)
    whole = tokenizer.encode(tail + text, add_special_tokens=False)
    if whole[:len(head)] == head and len(whole) > len(head):
        return whole[len(head):]
    return tokenizer.encode(text, add_special_tokens=False)


def _feed(model, cache, ids: list[int]) -> torch.Tensor:
    """Run `ids` through the model, continuing `cache`; the log-probabilities of the next token, (V,) float32."""
    x = torch.tensor([ids], device=next(model.parameters()).device)  # (1, T)
    for piece in x.split(PREFILL_CHUNK, dim=1):
        out = model(input_ids=piece, cache=cache, use_cache=True, logits_to_keep=1)
    return out.logits[0, -1].float().log_softmax(-1)  # (V,)


def candidate_scores(model, cache, logprobs: torch.Tensor, candidates: list[list[int]]) -> list[float]:
    """Total log-probability of each candidate's tokens after the context held in `cache`, whose next-token
    log-probabilities are `logprobs`. `cache` is left as it is (the candidates run on copies, a group at a time)."""
    scores = [float(logprobs[c[0]]) for c in candidates]
    longest = max(len(c) for c in candidates)
    if longest == 1:
        return scores
    group = max(1, min(len(candidates), COPY_BUDGET_BYTES // max(cache_bytes(cache), 1)))
    device = logprobs.device
    for start in range(0, len(candidates), group):
        chunk = candidates[start:start + group]
        rows = torch.tensor([c[:-1] + [c[0]] * (longest - len(c)) for c in chunk], device=device)  # (G, longest-1)
        out = model(input_ids=rows, cache=copy_cache(cache, len(chunk)), use_cache=True)
        logp = out.logits.float().log_softmax(-1)  # (G, longest-1, V); right padding only follows what is scored
        for i, c in enumerate(chunk):
            target = torch.tensor(c[1:], device=device)  # (len(c)-1,)
            scores[start + i] += float(logp[i, torch.arange(len(c) - 1, device=device), target].sum())
    return scores


def choice_credit(scores: list[float], right: int = 0) -> float:
    """1 if scores[right] is the single highest; 1 / k if it ties with k - 1 others at the top; else 0."""
    best = max(scores)
    tied = [i for i, s in enumerate(scores) if s >= best - TIE_TOLERANCE * max(1.0, abs(best))]
    return 1.0 / len(tied) if right in tied else 0.0


def greedy_text(model, tokenizer, cache, logprobs: torch.Tensor, max_tokens: int, stop_chars: int) -> str:
    """Greedy continuation of up to `max_tokens` tokens, stopping at EOS or once the text holds `stop_chars`
    characters besides spaces. Continues (and changes) `cache`."""
    tokens: list[int] = []
    for step in range(max_tokens):
        token = int(logprobs.argmax())
        if token == tokenizer.eos_token_id:
            break
        tokens.append(token)
        if step == max_tokens - 1 or len(tokenizer.decode(tokens, skip_special_tokens=True).strip()) >= stop_chars:
            break
        logprobs = _feed(model, cache, [token])
    return tokenizer.decode(tokens, skip_special_tokens=True)


@torch.inference_mode()
def score_sample(model, tokenizer, sample: RecallSample, generate_tokens: int = 8) -> tuple[list[tuple], int]:
    """[(log-likelihood credit, generation correct)] per query of `sample`, and the tokens read. Query i follows the
    context, the earlier queries and their right answers (teacher forcing)."""
    ids = tokenizer(sample.context)["input_ids"]
    cache = new_cache(model)
    logprobs, text, read = _feed(model, cache, ids), sample.context, len(ids)
    marks = []
    for i, query in enumerate(sample.queries):
        last = i == len(sample.queries) - 1
        if query.text:
            piece = continuation_ids(tokenizer, text, query.text)
            logprobs, text, read = _feed(model, cache, piece), text + query.text, read + len(piece)
        options = [continuation_ids(tokenizer, text, a) for a in (query.answer, *query.distractors)]
        credit = choice_credit(candidate_scores(model, cache, logprobs, options))
        answer = query.answer.strip()
        generated = greedy_text(model, tokenizer, cache if last else copy_cache(cache), logprobs, generate_tokens,
                                len(answer))
        marks.append((credit, generated.strip().startswith(answer)))
        if not last:
            logprobs, text, read = _feed(model, cache, options[0]), text + query.answer, read + len(options[0])
    return marks, read


def _score_cell(model, tokenizer, cell: dict, samples: list[RecallSample], generate_tokens: int) -> dict:
    marks, read = [], []
    for sample in samples:
        sample_marks, tokens = score_sample(model, tokenizer, sample, generate_tokens)
        marks += sample_marks
        read.append(tokens)
    n = len(marks)
    return {**cell, "acc_ll": sum(c for c, _ in marks) / n, "acc_gen": sum(g for _, g in marks) / n,
            "samples": len(samples), "queries": n, "tokens": sum(read) / len(read)}


def run_recall(model, tokenizer, settings: RecallSettings) -> dict:
    """Score `model` on the cells of `settings.task`; JSON-able {"task", "chance", "settings", "cells"}, a cell being
    {length, depth | pairs, acc_ll, acc_gen, samples, queries, tokens (mean read per sample)}. Sets eval mode."""
    if not isinstance(settings, RecallSettings):
        raise T2RError(f"run_recall takes a RecallSettings, got {type(settings).__name__}")
    model.eval()
    cells = []
    for cell, samples in RECALL_TASKS.get(settings.task)(tokenizer, settings):
        cells.append(_score_cell(model, tokenizer, cell, samples, settings.generate_tokens))
        log.info("%s %s: log-likelihood %.2f, generation %.2f", settings.task, cell, cells[-1]["acc_ll"],
                 cells[-1]["acc_gen"])
    return {"task": settings.task, "chance": 1.0 / (settings.distractors + 1), "settings": settings.to_dict(),
            "cells": cells}


# ----------------------------------------------------------------------------- plot


def _panels(result: dict) -> list[tuple[str, dict]]:
    """(label, run_recall result) for each model in a command result, or the one result itself."""
    if "cells" in result:
        return [("model", result)]
    panels = [(label, result[name]) for name, label in MODELS.items() if name in result]
    if not panels:
        raise T2RError("plot_recall needs a run_recall result, or a dict holding them under 'teacher'/'student'")
    return panels


def _heatmap(ax, label: str, r: dict) -> object:
    lengths = sorted({c["length"] for c in r["cells"]})
    depths = sorted({c["depth"] for c in r["cells"]})
    grid = torch.full((len(lengths), len(depths)), float("nan"))  # (lengths, depths)
    for c in r["cells"]:
        grid[lengths.index(c["length"]), depths.index(c["depth"])] = c["acc_ll"]
    image = ax.imshow(grid.numpy(), vmin=0.0, vmax=1.0, cmap="RdYlGn", aspect="auto", origin="lower")
    for i in range(len(lengths)):
        for j in range(len(depths)):
            ax.text(j, i, f"{float(grid[i, j]):.2f}", ha="center", va="center", fontsize=7)
    ax.set(xticks=range(len(depths)), xticklabels=[f"{d:g}" for d in depths], yticks=range(len(lengths)),
           yticklabels=[str(n) for n in lengths], xlabel="depth of the pass key", ylabel="context (tokens)", title=label)
    return image


def _pairs_lines(ax, panels: list[tuple[str, dict]]) -> None:
    for label, r in panels:
        cells = sorted(r["cells"], key=lambda c: c["pairs"])
        xs = [c["pairs"] for c in cells]
        ax.plot(xs, [c["acc_ll"] for c in cells], "-o", label=f"{label}, log-likelihood")
        ax.plot(xs, [c["acc_gen"] for c in cells], "--s", label=f"{label}, generation")
    ax.axhline(panels[0][1]["chance"], color="gray", linestyle=":", label="chance")
    ax.set(xscale="log", ylim=(-0.02, 1.02), xlabel="key-value pairs", ylabel="accuracy", title="MQAR accuracy")
    ax.set_xticks(xs, [str(x) for x in xs], minor=False)
    ax.set_xticks([], minor=True)
    ax.legend(fontsize=7)


def plot_recall(result: dict, path: str | Path) -> Path:
    """PNG: passkey accuracy as a length x depth heat map per model (teacher and student side by side), or MQAR
    accuracy against the number of pairs. `result`: a run_recall result or {"teacher": ..., "student": ...}."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise T2RError("--plot needs matplotlib: pip install matplotlib (or t2r[bench])") from None
    panels = _panels(result)
    passkey = panels[0][1]["task"] == "passkey"
    fig = Figure(figsize=(5 * len(panels) + 1, 4) if passkey else (6, 4), dpi=100)
    FigureCanvasAgg(fig)
    if passkey:
        axes = fig.subplots(1, len(panels), squeeze=False)[0]
        for ax, (label, r) in zip(axes, panels):
            image = _heatmap(ax, label, r)
        for ax in axes[1:]:
            ax.set_ylabel("")
        fig.colorbar(image, ax=list(axes), shrink=0.8, label="accuracy")
        fig.suptitle(f"passkey retrieval: accuracy by log-likelihood (chance {panels[0][1]['chance']:.2f})")
    else:
        _pairs_lines(fig.subplots(), panels)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path
