"""Perplexity and friends: the converted model (student) beside its original softmax model (teacher), same tokens.

Two ways to count, both with the model's full forward (chunked form for a converted model, no cache):

* :func:`perplexity` over packed token blocks ``[N, T]`` (from :func:`t2r.data.prepare_data`): each block, or each
  non-overlapping window of ``context`` tokens of it, predicts its tokens 2..len from what came before inside the
  window; mean NLL over all predicted tokens, perplexity = exp(NLL).
* :func:`text_perplexity` over documents (a text file, a .jsonl, a folder): lm-evaluation-harness's
  ``loglikelihood_rolling``, reproduced here so the two can be compared number for number. Each document is encoded
  as ``tokenizer.encode(doc)`` (the tokenizer's own special tokens; none when the document already starts with the
  prefix token's text), a prefix token (BOS, else EOS) is put before it, and it is cut into disjoint windows of
  ``max_length`` predicted tokens; every window after the first conditions on the one token before it, except the
  last, which is filled back to ``max_length`` inputs with earlier tokens. Word perplexity is
  exp(total NLL / words) with words = ``len(re.split(r"\\s+", doc))``, byte perplexity exp(NLL / UTF-8 bytes),
  bits per byte NLL / bytes / ln 2: the definitions of lm-eval's ``ConfigurableTask.process_results``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .corpora import cache_root
from .errors import T2RError
from .io import write_json

log = logging.getLogger(__name__)

SPLITS = ("train", "heldout")
DEFAULT_BLOCK_SIZE = 512


def _exp(x: float) -> float:
    """exp, inf instead of an OverflowError for a loss beyond float range (a broken model)."""
    return math.exp(x) if x < 709 else float("inf")


# ----------------------------------------------------------------------------- forward passes


@torch.inference_mode()
def _token_logprobs(model, input_ids: torch.Tensor) -> torch.Tensor:
    """log p(x_{t+1} | x_<=t) for every position but the last: [B, T] -> [B, T-1] float32."""
    device = next(model.parameters()).device
    input_ids = input_ids.to(device)
    logits = model(input_ids=input_ids, use_cache=False).logits[:, :-1].float()  # (B, T-1, V)
    logprobs = F.log_softmax(logits, dim=-1)  # (B, T-1, V)
    return logprobs.gather(-1, input_ids[:, 1:, None]).squeeze(-1).cpu()  # (B, T-1)


def _bar(total: int, progress: str | None):
    return tqdm(total=total, desc=progress, unit="window", disable=progress is None, leave=False)


def _windows(blocks: torch.Tensor, context: int) -> list[torch.Tensor]:
    """Each block cut into non-overlapping windows of `context` tokens (the last one shorter if T % context);
    returned grouped by length: a list of [n, len] tensors. Windows of one token predict nothing and are dropped."""
    T = blocks.shape[1]
    groups = [blocks[:, start:start + context] for start in range(0, T, context)]  # each (N, <=context)
    by_length: dict[int, list[torch.Tensor]] = {}
    for g in groups:
        if g.shape[1] > 1:
            by_length.setdefault(g.shape[1], []).append(g)
    return [torch.cat(gs) for _, gs in sorted(by_length.items(), reverse=True)]


def perplexity(model, blocks: torch.Tensor, *, context: int | None = None, batch_size: int = 4,
               max_blocks: int | None = None, byte_count: int | None = None, progress: str | None = None) -> dict:
    """Mean next-token NLL of `model` over token blocks [N, T], perplexity = exp(NLL).

    `context` (default T) cuts each block into non-overlapping windows of that many tokens, each evaluated on its
    own. `max_blocks` keeps the first blocks only. `byte_count` (the UTF-8 bytes of the predicted tokens, see
    :func:`predicted_bytes`) adds bits per byte. `progress` labels a progress bar on stderr (None: no bar).
    Returns {"nll", "ppl", "tokens", "windows", "context"} (+ "bytes", "bits_per_byte")."""
    blocks = _check_blocks(blocks, context, batch_size, max_blocks)
    context = context or blocks.shape[1]
    groups = _windows(blocks, context)
    total_nll, tokens, windows = 0.0, 0, 0
    with _bar(sum(g.shape[0] for g in groups), progress) as bar:
        for group in groups:
            for start in range(0, group.shape[0], batch_size):
                batch = group[start:start + batch_size]  # (b, len)
                logprobs = _token_logprobs(model, batch)  # (b, len-1)
                total_nll -= float(logprobs.double().sum())
                tokens += logprobs.numel()
                windows += batch.shape[0]
                bar.update(batch.shape[0])
    return _summary(total_nll, tokens, byte_count, windows=windows, context=context)


def eval_cache_dir() -> Path:
    """Where evaluation results are kept: the `evals` folder of t2r's cache ($T2R_CACHE, else ~/.cache/t2r/corpora)."""
    return cache_root(None) / "evals"


# Bumped whenever t2r computes a different output from the same weights and recipe, so that results remembered on
# disk (held-out perplexities, teacher logits) are not reused across the change. 2: the delta-rule window hybrid reads
# the softmax window alone until a token has entered its memory.
FORWARD_REVISION = 2


def model_fingerprint(model) -> str:
    """sha256 of everything a forward pass depends on: every tensor of the state dict (names, dtypes, shapes, bytes),
    the t2r recipe (window, kept layers, ... are not weights) and t2r's FORWARD_REVISION (the code's math)."""
    h = hashlib.sha256(f"forward:{FORWARD_REVISION}|".encode())
    h.update(json.dumps(getattr(model.config, "t2r", None), sort_keys=True).encode())
    return hash_tensors(h, sorted(model.state_dict().items())).hexdigest()


def hash_tensors(h, named):
    """`h` updated with each (name, tensor) of `named`: its name, dtype, shape and bytes (bit for bit)."""
    for name, tensor in named:
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}:{flat.dtype}:{tuple(tensor.shape)}".encode())
        h.update(flat.view(torch.uint8).numpy())
    return h


def cached_perplexity(model, blocks: torch.Tensor, *, context: int | None = None, batch_size: int = 4,
                      max_blocks: int | None = None, progress: str | None = None,
                      cache_dir: str | Path | None = None, fingerprint: str | None = None) -> dict:
    """:func:`perplexity`, remembered on disk: the same weights, recipe, tokens and settings are evaluated once
    (pipelines that share a stage, e.g. every recipe's original-model row, or a rerun). Keyed by
    :func:`model_fingerprint` (pass `fingerprint` to reuse one computed for several evaluations of the same model)
    and the bytes of the evaluated blocks; the result is a small JSON file."""

    blocks = _check_blocks(blocks, context, batch_size, max_blocks)
    fingerprint = fingerprint or model_fingerprint(model)
    key = hashlib.sha256(f"{fingerprint}|{context}|{batch_size}|{tuple(blocks.shape)}".encode())
    key.update(blocks.to(torch.int64).contiguous().numpy())
    path = Path(cache_dir or eval_cache_dir()) / f"{key.hexdigest()}.json"
    if path.is_file():
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            pass  # a damaged entry is recomputed
    result = perplexity(model, blocks, context=context, batch_size=batch_size, progress=progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, result)  # readers see all of it or nothing
    return result


def _summary(total_nll: float, tokens: int, byte_count: int | None, **extra) -> dict:
    nll = total_nll / tokens
    out = {"nll": nll, "ppl": _exp(nll), "tokens": tokens, **extra}
    if byte_count:
        out["bytes"] = byte_count
        out["bits_per_byte"] = total_nll / math.log(2) / byte_count
    return out


def _check_blocks(blocks, context, batch_size, max_blocks) -> torch.Tensor:
    if not isinstance(blocks, torch.Tensor) or blocks.dim() != 2 or blocks.dtype != torch.long:
        raise T2RError(f"blocks must be a [N, T] LongTensor of token ids, got "
                       f"{getattr(blocks, 'shape', type(blocks).__name__)} {getattr(blocks, 'dtype', '')}")
    if context is not None and context < 2:
        raise T2RError(f"context must be at least 2 tokens (one to condition on, one to predict), got {context}")
    if batch_size <= 0:
        raise T2RError(f"batch_size must be positive, got {batch_size}")
    if max_blocks is not None:
        if max_blocks <= 0:
            raise T2RError(f"max_blocks must be positive, got {max_blocks}")
        blocks = blocks[:max_blocks]
    if blocks.shape[0] == 0 or blocks.shape[1] < 2:
        raise T2RError(f"no tokens to evaluate: blocks have shape {tuple(blocks.shape)}")
    return blocks


def predicted_bytes(tokenizer, blocks: torch.Tensor, context: int | None = None) -> int:
    """UTF-8 bytes of the tokens :func:`perplexity` predicts (all but the first of each window), decoded window by
    window without special tokens (EOS between documents is no text). A character split across two windows may
    count a replacement character instead: a few bytes in a corpus."""
    context = context or blocks.shape[1]
    return sum(len(tokenizer.decode(window[1:].tolist(), skip_special_tokens=True).encode("utf-8"))
               for group in _windows(blocks, context) for window in group)


# ----------------------------------------------------------------------------- lm-eval's rolling loglikelihood


def prefix_token_id(tokenizer) -> int:
    """The token lm-eval puts before a document: BOS, else EOS."""
    token = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if token is None:
        raise T2RError("the tokenizer has neither a BOS nor an EOS token to start a document with")
    return int(token)


def encode_document(tokenizer, text: str) -> list[int]:
    """lm-eval's `HFLM.tok_encode`: the tokenizer's default special tokens, none if `text` starts with the prefix
    token's own text."""
    if text.startswith(tokenizer.decode(prefix_token_id(tokenizer))):
        return tokenizer.encode(text, add_special_tokens=False)
    return tokenizer.encode(text)


def rolling_windows(tokens: list[int], prefix_token: int, max_length: int) -> list[tuple[list[int], int]]:
    """lm-eval's `get_rolling_token_windows(context_len=1)` + `make_disjoint_window`, as (input ids, n): the model
    reads the input and the last n positions are scored against the n tokens that follow each of them."""
    if max_length < 1:
        raise T2RError(f"max_length must be positive, got {max_length}")
    full = [prefix_token] + list(tokens)  # position i + 1 holds target i
    out, predicted = [], 0
    while predicted < len(tokens):
        n = min(max_length, len(tokens) - predicted)
        end = predicted + n  # the window predicts full[end - n + 1 : end + 1]
        out.append((full[max(0, end - max_length):end + 1], n))  # inputs + the last target
        predicted = end
    return out


@torch.inference_mode()
def rolling_loglikelihood(model, documents: list[list[int]], *, prefix_token: int, max_length: int,
                          batch_size: int = 1, progress: str | None = None) -> list[float]:
    """Total log-likelihood of each tokenised document under lm-eval's rolling windows (see the module docstring)."""
    work = [(doc, ids, n) for doc, tokens in enumerate(documents)
            for ids, n in rolling_windows(tokens, prefix_token, max_length)]
    work.sort(key=lambda w: -len(w[1]))  # equal lengths batch together
    totals = [0.0] * len(documents)
    with _bar(len(work), progress) as bar:
        start = 0
        while start < len(work):
            length = len(work[start][1])
            batch = [w for w in work[start:start + batch_size] if len(w[1]) == length]
            logprobs = _token_logprobs(model, torch.tensor([ids for _, ids, _ in batch]))  # (b, length-1)
            for row, (doc, _, n) in zip(logprobs, batch):
                totals[doc] += float(row[-n:].double().sum())
            start += len(batch)
            bar.update(len(batch))
    return totals


def count_words(text: str) -> int:
    """lm-eval's word count for perplexity tasks."""
    return len(re.split(r"\s+", text))


def text_perplexity(model, tokenizer, documents: list[str], *, max_length: int, batch_size: int = 1,
                    progress: str | None = None) -> dict:
    """lm-eval's `loglikelihood_rolling` metrics for `documents`: word_perplexity, byte_perplexity, bits_per_byte,
    plus the token-level nll / ppl and the counts."""
    ids = [encode_document(tokenizer, doc) for doc in documents]
    if not any(ids):
        raise T2RError("the text has no tokens to evaluate")
    loglik = rolling_loglikelihood(model, ids, prefix_token=prefix_token_id(tokenizer), max_length=max_length,
                                   batch_size=batch_size, progress=progress)
    total_nll = -sum(loglik)
    words = sum(count_words(doc) for doc in documents)
    n_bytes = sum(len(doc.encode("utf-8")) for doc in documents)
    out = _summary(total_nll, sum(len(t) for t in ids), n_bytes, documents=len(documents), words=words,
                   max_length=max_length)
    out["word_perplexity"] = _exp(total_nll / words)
    out["byte_perplexity"] = _exp(total_nll / n_bytes)
    return out


# ----------------------------------------------------------------------------- the `t2r eval` command
