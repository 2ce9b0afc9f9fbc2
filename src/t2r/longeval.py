"""Loss by position over long documents: does a model's loss keep falling as it sees more of a document?

A document of L tokens is read in chunks of `chunk` tokens that carry the model's cache: for a converted model that is
its fixed-size recurrent state (bounded memory at any length), for the original softmax model its growing KV cache.
Every token after the first is predicted from everything before it in the document; the per-token NLLs are then
averaged in position buckets (0-64, 64-256, 256-1k, 1k-4k, 4k-8k, 8k-16k, ...): position t is the index of the
predicted token in its document. For a softmax model the KV cache grows with L; `max_cache_bytes` stops it where
the cache has grown past that size (checked before each chunk), and the result says where it stopped.

    result = position_losses(model, docs, chunk=2048)   # docs: [N, L] token ids (e.g. the long held-out documents)
    result["buckets"]  -> [{"start": 0, "end": 64, "tokens": ..., "nll": ..., "ppl": ...}, ...]
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .adapters import adapter_for, cache_bytes
from .data import prepare_data
from .errors import T2RError
from .generate import new_cache

BUCKET_EDGES = (0, 64, 256, 1024, 4096, 8192, 16384, 32768, 65536)


@dataclass(frozen=True)
class PositionSettings:
    """How to read long documents: `chunk` tokens per forward (carrying the cache), bucket edges (positions),
    a cap on the KV cache of softmax models (None: no cap), a progress-bar label (None: no bar)."""

    chunk: int = 512
    edges: tuple[int, ...] = BUCKET_EDGES
    max_cache_bytes: int | None = None
    progress: str | None = None

    def __post_init__(self) -> None:
        if self.chunk < 1:
            raise T2RError(f"the chunk length must be positive, got {self.chunk}")
        if list(self.edges) != sorted(set(self.edges)) or len(self.edges) < 2 or self.edges[0] != 0:
            raise T2RError(f"bucket edges must rise from 0, got {self.edges}")


@torch.inference_mode()
def document_nll(model, ids: torch.Tensor, settings: PositionSettings = PositionSettings()) -> torch.Tensor:
    """Per-token NLL of `ids` ([B, L]) read in chunks that carry the cache: [B, L-1] float64, entry t-1 is the loss
    of token t given tokens < t. Entries after a stop for the cache cap are NaN."""
    B, L = ids.shape
    device = next(model.parameters()).device
    ids = ids.to(device)
    nll = torch.full((B, L - 1), float("nan"), dtype=torch.float64)
    cache, carry = new_cache(model), None  # carry: the last logits of the previous chunk (predict its next token)
    for start in range(0, L, settings.chunk):
        piece = ids[:, start:start + settings.chunk]  # (B, c)
        if settings.max_cache_bytes is not None and cache_bytes(cache) > settings.max_cache_bytes:
            break  # the cache has grown past the cap
        positions = torch.arange(start, start + piece.shape[1], device=device).expand(B, -1)  # (B, c)
        logits = model(input_ids=piece, position_ids=positions, cache=cache, use_cache=True).logits.float()
        logprobs = F.log_softmax(logits, -1)  # (B, c, V)
        if carry is not None:
            nll[:, start - 1] = -carry.gather(-1, piece[:, :1]).squeeze(-1).double().cpu()
        inner = -logprobs[:, :-1].gather(-1, piece[:, 1:, None]).squeeze(-1)  # (B, c-1)
        nll[:, start:start + inner.shape[1]] = inner.double().cpu()
        carry = logprobs[:, -1].clone()  # (B, V); a copy, so the chunk's [B, c, V] log-probabilities can go
    return nll


def bucket_losses(nll: torch.Tensor, edges: tuple[int, ...] = BUCKET_EDGES) -> list[dict]:
    """Mean NLL of the predicted positions t in [start, end) per bucket (t = 1..L-1; NaN entries are skipped);
    buckets past the documents' length are left out. `tokens` weights: sum(tokens * nll) = the total NLL."""
    L = nll.shape[1] + 1
    positions = torch.arange(1, L)  # (L-1,) the predicted token's index
    out = []
    for start, end in zip(edges, edges[1:]):
        if start >= L:
            break
        cols = (positions >= start) & (positions < end)
        values = nll[:, cols]
        values = values[~values.isnan()]
        if values.numel():
            mean = float(values.mean())
            out.append({"start": start, "end": end, "tokens": int(values.numel()), "nll": mean,
                        "ppl": math.exp(min(mean, 50.0))})
    return out


def position_losses(model, docs: torch.Tensor, settings: PositionSettings = PositionSettings()) -> dict:
    """Loss by position of `model` over long documents `docs` ([N, L] token ids), one document per forward pass
    chain. Returns {"buckets", "nll", "tokens", "length", "documents", "chunk", "stopped_at", "trained_context"}:
    `stopped_at` is the number of tokens read when the cache cap stopped the reading (None: read to the end), and
    `trained_context` the context the model was trained on (`trained_context`)."""
    if docs.dim() != 2 or docs.shape[1] < 2:
        raise T2RError(f"documents must be [N, L] token ids with L >= 2, got {tuple(docs.shape)}")
    check_length(model, docs.shape[1])
    rows = []
    for i in tqdm(range(docs.shape[0]), desc=settings.progress, unit="doc", disable=settings.progress is None,
                  leave=False):
        rows.append(document_nll(model, docs[i:i + 1], settings))
    nll = torch.cat(rows)  # (N, L-1)
    seen = ~nll.isnan()
    stopped = None if bool(seen.all()) else int(seen.all(0).sum()) + 1
    total = float(nll[seen].sum())
    return {"buckets": bucket_losses(nll, settings.edges), "nll": total / max(1, int(seen.sum())),
            "tokens": int(seen.sum()), "length": int(docs.shape[1]), "documents": int(docs.shape[0]),
            "chunk": settings.chunk, "stopped_at": stopped, "trained_context": trained_context(model)}


def trained_context(model) -> int | None:
    """The context length the model was trained on, as its config says (None when it does not say)."""
    config = model.config.get_text_config(decoder=True)
    for name in ("max_position_embeddings", "n_positions"):
        if isinstance(getattr(config, name, None), int):
            return getattr(config, name)
    return None


def check_length(model, length: int) -> None:
    """Refuse a document longer than a model with learned absolute positions can place (GPT-2's n_positions); models
    with rotary positions read past their trained context (the result marks those buckets)."""
    limit = adapter_for(model).max_positions(model.config)
    if limit is not None and length > limit:
        raise T2RError(f"documents of {length} tokens are longer than this model's {limit} learned positions: "
                       f"use --context {limit} or less")


def long_documents(source: str, tokenizer, length: int, max_documents: int | None = None) -> torch.Tensor:
    """The held-out documents of `source` (anything `t2r.data.prepare_data` reads) cut to `length` tokens: [N, L].
    Builtin corpora hold out whole stretches of 16,384 tokens (the split rule of `t2r.data`), so `length` can go up to
    16,384; a longer one is refused with the longest that works."""
    docs = prepare_data(source, tokenizer, block_size=length).heldout  # (N, L)
    return docs if max_documents is None else docs[:max_documents]


def plot_positions(results: dict, path: str | Path, title: str = "") -> Path:
    """Per-bucket perplexity against position (log scale), one line per model: name -> a `position_losses` result."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4.2))
    axes = figure.add_subplot()
    for name, result in results.items():
        buckets = result["buckets"]
        middles = [(b["start"] + min(b["end"], result["length"])) / 2 for b in buckets]
        axes.plot(middles, [b["ppl"] for b in buckets], marker="o", label=name)
    axes.set_xscale("log", base=2)
    axes.set_yscale("log")
    axes.set_xlabel("position in the document (tokens; bucket middles)")
    axes.set_ylabel("perplexity of the tokens in the bucket (log)")
    axes.set_title(title or "loss by position")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(figure).print_png(str(path))
    return path
