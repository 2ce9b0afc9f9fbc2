"""Translation with an encoder-decoder model (converted or not): sources -> token ids (truncated to the encoder's
positions, with a warning), beam search, sacrebleu's BLEU and chrF, and teacher-forced training on sentence pairs.

A source longer than the encoder's learned/sinusoidal positions (`max_position_embeddings`) cannot be placed at all:
it is cut to that many tokens (the last one kept as the tokenizer's end-of-sentence token) and a warning names how
many sources were cut.
"""

from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import dataclass

import torch
from torch import nn

from .attention import is_conversion_parameter
from .errors import T2RError
from .stages.teacher_cache import full_kl

log = logging.getLogger(__name__)


def check_translation_model(model: nn.Module, what: str = "this command") -> None:
    """Raise T2RError unless `model` is an encoder-decoder (a translation model)."""
    if not getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        kind = str(getattr(getattr(model, "config", None), "model_type", type(model).__name__)).removeprefix("t2r_")
        raise T2RError(f"{what} needs a translation (encoder-decoder) model such as Marian or BART; this one is a "
                       f"decoder-only {kind} language model: measure it with perplexity (`t2r eval` without --bleu)")


def max_source_tokens(model: nn.Module) -> int | None:
    return getattr(model.config, "max_position_embeddings", None)


def encode_sources(tokenizer, texts: list[str], limit: int | None) -> list[list[int]]:
    """Token ids of each source (special tokens included), each cut to `limit` tokens with its last token kept."""
    ids = [tokenizer(text)["input_ids"] for text in texts]
    if limit is None:
        return ids
    long = [i for i, x in enumerate(ids) if len(x) > limit]
    if long:
        log.warning("%d source(s) longer than the encoder's %d positions were truncated (the first: %d tokens)",
                    len(long), limit, len(ids[long[0]]))
    return [x if len(x) <= limit else x[: limit - 1] + x[-1:] for x in ids]


def pad_batch(rows: list[list[int]], pad_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded (ids [B, L], mask [B, L])."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((len(rows), width), dtype=torch.long, device=device)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, : len(row)] = 1
    return ids, mask


def pad_id_of(model: nn.Module, tokenizer) -> int:
    pad = getattr(tokenizer, "pad_token_id", None)
    return int(pad if pad is not None else model.config.pad_token_id)


@torch.no_grad()
def translate(model: nn.Module, tokenizer, texts: list[str], *, beam: int = 4, batch_size: int = 16,
              max_new_tokens: int | None = None) -> list[str]:
    """Beam-search translations of `texts` (batches padded on the right; the encoder mask leaves the padding out).
    `max_new_tokens` defaults to twice the longest source plus 10, within the decoder's positions."""
    check_translation_model(model, "translation")
    if beam < 1:
        raise T2RError(f"--beam must be at least 1, got {beam}")
    model.eval()
    limit = max_source_tokens(model)
    ids = encode_sources(tokenizer, texts, limit)
    device = next(model.parameters()).device
    out: list[str] = []
    for start in range(0, len(ids), batch_size):
        rows = ids[start: start + batch_size]
        src, mask = pad_batch(rows, pad_id_of(model, tokenizer), device)
        budget = max_new_tokens or 2 * src.shape[1] + 10
        if limit is not None:
            budget = min(budget, limit - 1)
        generated = model.generate(input_ids=src, attention_mask=mask, num_beams=beam, max_new_tokens=budget,
                                   do_sample=False, early_stopping=True)
        out.extend(tokenizer.batch_decode(generated, skip_special_tokens=True))
    return [text.strip() for text in out]


def bleu_chrf(hypotheses: list[str], references: list[str]) -> dict:
    """sacrebleu's corpus BLEU (13a tokenisation) and chrF (pip install 'sacrebleu' or the `mt` extra)."""
    try:
        import sacrebleu
    except ImportError:
        raise T2RError("BLEU and chrF need sacrebleu: pip install sacrebleu (or t2r[mt])") from None
    bleu, chrf = sacrebleu.metrics.BLEU(), sacrebleu.metrics.CHRF()
    return {"bleu": round(bleu.corpus_score(hypotheses, [references]).score, 2),
            "chrf": round(chrf.corpus_score(hypotheses, [references]).score, 2),
            "signature": {"bleu": str(bleu.get_signature()), "chrf": str(chrf.get_signature())}}


def translation_scores(model: nn.Module, tokenizer, pairs: list[tuple[str, str]], *, beam: int = 4,
                       batch_size: int = 16, keep_hypotheses: bool = False) -> dict:
    """BLEU and chrF of `model`'s beam-search translations of the sources of `pairs` against their targets (with
    `keep_hypotheses`, every translation too, under "hypotheses")."""
    start = time.perf_counter()
    hypotheses = translate(model, tokenizer, [s for s, _ in pairs], beam=beam, batch_size=batch_size)
    scores = bleu_chrf(hypotheses, [t for _, t in pairs])
    return {**scores, "sentences": len(pairs), "beam": beam, "seconds": round(time.perf_counter() - start, 2),
            "examples": [{"src": s, "ref": t, "hyp": h} for (s, t), h in list(zip(pairs, hypotheses))[:3]],
            **({"hypotheses": hypotheses} if keep_hypotheses else {})}


# ----------------------------------------------------------------------------- teacher-forced training


@dataclass(frozen=True)
class PairTraining:
    """How `train_pairs` trains: a budget of target tokens, AdamW with linear warmup then cosine decay."""

    tokens: int
    batch_size: int = 32
    lr: float = 5e-4
    warmup: float = 0.05
    min_lr: float = 0.1
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 0
    max_length: int = 128
    kd: float = 0.0  # weight of KL(teacher || student) per target token, added to the cross-entropy (needs a teacher)


def encode_pairs(tokenizer, pairs: list[tuple[str, str]], max_length: int) -> list[tuple[list[int], list[int]]]:
    """(source ids, target ids) of each pair, special tokens included, each cut to `max_length`."""
    cut = lambda x: x if len(x) <= max_length else x[: max_length - 1] + x[-1:]  # noqa: E731
    out = []
    for src, tgt in pairs:
        out.append((cut(tokenizer(src)["input_ids"]), cut(tokenizer(text_target=tgt)["input_ids"])))
    return out


def pair_inputs(batch: list[tuple[list[int], list[int]]], pad_id: int, device) -> dict:
    """The model's keyword inputs for teacher forcing on `batch`: padded sources, their mask, and the labels (-100 on
    padding; the model shifts them right to make the decoder's inputs)."""
    src, mask = pad_batch([s for s, _ in batch], pad_id, device)
    labels, label_mask = pad_batch([t for _, t in batch], pad_id, device)
    return {"input_ids": src, "attention_mask": mask, "labels": labels.masked_fill(label_mask == 0, -100),
            "use_cache": False}


def pair_loss(model: nn.Module, batch: list[tuple[list[int], list[int]]], pad_id: int) -> tuple[torch.Tensor, int]:
    """Mean cross-entropy over the target tokens of `batch` (teacher forcing), and the number of target tokens."""
    inputs = pair_inputs(batch, pad_id, next(model.parameters()).device)
    return model(**inputs).loss, int((inputs["labels"] != -100).sum())


def pair_kd_loss(model: nn.Module, teacher: nn.Module, batch: list[tuple[list[int], list[int]]], pad_id: int,
                 kd: float) -> tuple[torch.Tensor, int]:
    """Cross-entropy + kd x KL(teacher || student) of the next-token distributions, both means over the target
    tokens of `batch` (word-level distillation; the teacher reads the same source and target prefix, without
    gradients), and the number of target tokens."""
    inputs = pair_inputs(batch, pad_id, next(model.parameters()).device)
    out = model(**inputs)
    with torch.no_grad():
        teacher_logits = teacher(**inputs).logits
    keep = inputs["labels"] != -100  # (B, T)
    kl = full_kl(out.logits[keep].float(), teacher_logits[keep].float())  # over the N target tokens
    return out.loss + kd * kl, int(keep.sum())


def lr_at(step: int, steps: int, settings: PairTraining) -> float:
    warm = settings.warmup * steps if settings.warmup < 1 else settings.warmup
    if step < warm:
        return settings.lr * (step + 1) / warm
    progress = min(1.0, (step - warm) / max(1.0, steps - warm))
    return settings.lr * (settings.min_lr + (1 - settings.min_lr) * 0.5 * (1 + math.cos(math.pi * progress)))


def length_batches(data: list, batch_size: int, rng: random.Random):
    """Endless batches of indices into `data`: shuffled, then sorted by source length within pools of 50 batches
    (little padding), the batches shuffled again."""
    while True:
        order = list(range(len(data)))
        rng.shuffle(order)
        pool = 50 * batch_size
        chunks = [sorted(order[i: i + pool], key=lambda j: len(data[j][0])) for i in range(0, len(order), pool)]
        batches = [c[j: j + batch_size] for c in chunks for j in range(0, len(c), batch_size)]
        rng.shuffle(batches)
        yield from batches


def _optimise(model, params, data, settings: PairTraining, loss_of, on_step) -> dict:
    """AdamW over `params` on `loss_of(batch) -> (loss, target tokens)` until `settings.tokens` target tokens."""
    mean_tokens = sum(len(t) for _, t in data) / len(data)
    steps = max(1, math.ceil(settings.tokens / (mean_tokens * settings.batch_size)))
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    seen, step, losses, start = 0, 0, [], time.perf_counter()
    for idx in length_batches(data, settings.batch_size, random.Random(settings.seed)):
        if seen >= settings.tokens:
            break
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, steps, settings)
        loss, n = loss_of([data[i] for i in idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if settings.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, settings.max_grad_norm)
        optimizer.step()
        seen, step = seen + n, step + 1
        losses.append(float(loss.detach()))
        if on_step is not None:
            on_step(step, losses[-1], seen)
    tail = losses[-max(1, len(losses) // 10):]
    return {"steps": step, "target_tokens": seen, "final_loss": round(sum(tail) / len(tail), 6),
            "seconds": round(time.perf_counter() - start, 2)}


def train_pairs(model: nn.Module, tokenizer, pairs: list[tuple[str, str]], settings: PairTraining, *,
                teacher: nn.Module | None = None, on_step=None) -> dict:
    """Train every parameter of `model` on `pairs` (teacher-forced cross-entropy on target tokens; with
    `settings.kd`, plus that weight times the KL divergence from `teacher`'s next-token distributions) until
    `settings.tokens` target tokens have been seen (the learning-rate schedule spans the steps that budget is
    expected to take); shuffled by `settings.seed`, batches of similar lengths. `on_step(step, loss, tokens)` is
    called after each optimizer step. Returns a summary."""
    check_translation_model(model, "training on sentence pairs")
    if settings.kd and teacher is None:
        raise T2RError("distillation (kd) needs a teacher model")
    if teacher is not None:
        check_translation_model(teacher, "the distillation teacher")
        if teacher.config.vocab_size != model.config.vocab_size:
            raise T2RError(f"the teacher's vocabulary ({teacher.config.vocab_size}) is not the student's "
                           f"({model.config.vocab_size}): distil from a model with the same tokenizer")
        teacher.eval()
    data, pad = encode_pairs(tokenizer, pairs, settings.max_length), pad_id_of(model, tokenizer)
    loss_of = (lambda batch: pair_kd_loss(model, teacher, batch, pad, settings.kd)) if settings.kd else \
        (lambda batch: pair_loss(model, batch, pad))
    model.train()
    try:
        return {**_optimise(model, [p for p in model.parameters() if p.requires_grad], data, settings, loss_of,
                            on_step), "kd": settings.kd}
    finally:
        model.eval()


def transfer_attention(model: nn.Module, tokenizer, pairs: list[tuple[str, str]], settings: PairTraining, *,
                       on_step=None) -> dict:
    """Attention transfer for a converted translation model: only the conversion's parameters (feature maps) train,
    so that each converted decoder attention (self and cross) gives the output of the softmax attention it replaced
    (same projections), mean squared error summed over layers, on the inputs the model itself hands each layer
    while reading `pairs` (teacher forcing). Every other weight is left as it was."""
    check_translation_model(model, "attention transfer")
    modules = [m for m in model.modules() if hasattr(m, "transfer_pair")]
    if not modules:
        raise T2RError("attention transfer needs a converted translation model (t2r convert)")
    captured: dict = {}
    hooks = [m.register_forward_pre_hook(lambda mod, args, kwargs: captured.__setitem__(mod, (args, kwargs)),
                                         with_kwargs=True) for m in modules]
    params = [p for n, p in model.named_parameters() if is_conversion_parameter(n)]
    data, pad = encode_pairs(tokenizer, pairs, settings.max_length), pad_id_of(model, tokenizer)

    def loss_of(batch):
        with torch.no_grad():
            _, n = pair_loss(model, batch, pad)  # fills `captured` with each module's inputs
        total = 0.0
        for module, (args, kwargs) in captured.items():
            linear, reference = module.transfer_pair(*args, **kwargs)
            total = total + torch.nn.functional.mse_loss(linear.float(), reference.float())
        return total, n

    frozen = [p for n, p in model.named_parameters() if p.requires_grad and not is_conversion_parameter(n)]
    for p in frozen:
        p.requires_grad_(False)
    model.eval()  # no dropout: the layers' inputs are the model's own
    try:
        return _optimise(model, params, data, settings, loss_of, on_step)
    finally:
        for hook in hooks:
            hook.remove()
        for p in frozen:
            p.requires_grad_(True)


@torch.no_grad()
def heldout_loss(model: nn.Module, tokenizer, pairs: list[tuple[str, str]], batch_size: int = 32,
                 max_length: int = 128) -> float:
    """Mean cross-entropy per target token over `pairs` (teacher forcing)."""
    check_translation_model(model, "held-out loss")
    model.eval()
    data, pad = encode_pairs(tokenizer, pairs, max_length), pad_id_of(model, tokenizer)
    total, count = 0.0, 0
    for i in range(0, len(data), batch_size):
        loss, n = pair_loss(model, data[i: i + batch_size], pad)
        total, count = total + float(loss) * n, count + n
    return total / max(count, 1)
