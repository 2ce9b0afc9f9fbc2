"""Commands for translation models: `t2r translate`, and the translation halves of `t2r eval --bleu` and
`t2r finetune` on parallel data (called from those commands)."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from ..errors import T2RError
from ..io import write_text
from ..parallel import load_pairs
from .models import check_converted, load_any, load_with_teacher, torch_dtype

log = logging.getLogger("t2r")
PAIR_BATCH = 32  # sentence pairs per step unless --batch-size says otherwise
# what needs torch or transformers is imported inside the command that uses it: `t2r --help` does not wait for it


def translate_command(model: str, *, src: str, beam: int = 4, max_new_tokens: int = 0, dtype: str = "float32",
                      as_json: bool = False) -> dict:
    """Translate a sentence with an encoder-decoder model (converted: its decoder runs as an RNN).

    Args:
        model: directory of a converted translation model, or a plain one (HF directory).
        src: the text to translate; a source longer than the encoder's positions is truncated, with a warning.
        beam: beam size (1: greedy).
        max_new_tokens: most tokens to generate (0: twice the source length plus 10).
        dtype: weights in float32, bfloat16 or float16 (the decoder's recurrent state stays float32).
        as_json: print the result as JSON.
    """
    from ..adapters import is_converted
    from ..translation import check_translation_model, translate

    torch_dtype(dtype)  # an unknown name stops before the model loads
    loaded, tokenizer = load_any(model, dtype=dtype, translation=True)
    check_translation_model(loaded, "t2r translate")
    start = time.perf_counter()
    text = translate(loaded, tokenizer, [src], beam=beam, max_new_tokens=max_new_tokens or None)[0]
    return {"model": model, "src": src, "translation": text, "beam": beam, "dtype": dtype,
            "converted": is_converted(loaded),
            "seconds": round(time.perf_counter() - start, 3)}


def bleu_eval(model: str, data: str, split: str, beam: int, max_pairs: int | None, teacher: bool,
              dtype: str = "float32") -> dict:
    """`t2r eval --bleu`: BLEU and chrF of the converted model's (and its original's) beam search on a split of
    parallel data."""
    from ..translation import check_translation_model, translation_scores

    student, load_teacher, tokenizer = load_with_teacher(model, dtype=dtype, translation=True)
    check_translation_model(student if student is not None else load_teacher(), "--bleu")
    pairs = load_pairs(data, split)[:max_pairs]
    result = {"model": model, "data": data, "split": split, "sentences": len(pairs), "beam": beam, "bleu_eval": True}
    if teacher or student is None:
        log.info("translating with the original model")
        result["teacher"] = translation_scores(load_teacher(), tokenizer, pairs, beam=beam)
    if student is not None:
        log.info("translating with the converted model")
        result["student"] = translation_scores(student, tokenizer, pairs, beam=beam)
    return result


def pair_batch_size(options) -> int:
    """Sentence pairs per step: --batch-size when given, else 32 (the language-model default, 1 block, is far too
    few sentences)."""
    return options.batch_size if "batch_size" in options.model_fields_set else PAIR_BATCH


def pair_settings(options, *, lr: float, kd: float = 0.0):
    """`t2r.translation.PairTraining` from a command's training settings (`--tokens`, `--warmup`, ...)."""
    from ..translation import PairTraining

    return PairTraining(tokens=options.tokens, batch_size=pair_batch_size(options), lr=lr, warmup=options.warmup,
                        min_lr=options.min_lr, weight_decay=options.weight_decay,
                        max_grad_norm=options.max_grad_norm, seed=options.seed, kd=kd)


def save_pair_run(model, tokenizer, out: str, metrics: list[str], *, overwrite: bool, remote_code: bool) -> None:
    """The trained model in `out` (`t2r.save`, with its code if `remote_code`), and its metrics.jsonl beside it."""
    from ..persistence import save

    save(model, out, tokenizer, overwrite=overwrite, remote_code=remote_code)
    write_text(Path(out) / "metrics.jsonl", "\n".join(metrics) + "\n")


def pair_teacher(student, teacher: str | None, kd: float):
    """The teacher of `t2r finetune --kd` on sentence pairs: --teacher (a model with the student's tokenizer), else
    the converted student's own original (its softmax model rebuilt from the weights it was given); None without
    --kd."""
    from ..adapters import is_converted, original_model

    if not kd:
        if teacher is not None:
            raise T2RError("--teacher is used only for distillation: add --kd WEIGHT (e.g. --kd 0.5)")
        return None
    if teacher is not None:
        return load_any(teacher, translation=True)[0]
    if not is_converted(student):
        raise T2RError("--kd distils from a teacher: finetune a converted model (its original is the teacher) or "
                       "name one with --teacher DIR")
    return original_model(student)


def finetune_pairs(model: str, data: str, options, out: str, overwrite: bool, teacher: str | None = None) -> dict:
    """`t2r finetune` on parallel data: teacher-forced cross-entropy on the target tokens (+ --kd x KL from the
    teacher's next-token distributions), every weight trained; the model is written to `out` at the end (no
    checkpoints or --resume here; with its code if `options.remote_code`)."""
    if options.lora or options.kd_top_k:
        raise T2RError("finetuning on sentence pairs trains every weight with a live teacher: --lora and "
                       "--kd-top-k are for language models")
    from ..train.checkpoint import check_run_dir
    from ..translation import check_translation_model, heldout_loss, train_pairs

    check_run_dir(Path(out), resume=False, overwrite=overwrite)
    student, tokenizer = load_any(model, translation=True)
    check_translation_model(student, "finetuning on sentence pairs")
    if options.remote_code:
        check_converted(student, model)
    teacher_model = pair_teacher(student, teacher, options.kd)
    train, heldout = load_pairs(data, "train"), load_pairs(data, "heldout")
    settings = pair_settings(options, lr=options.lr or 3e-4, kd=options.kd)
    before = heldout_loss(student, tokenizer, heldout)
    metrics: list[str] = []
    summary = train_pairs(student, tokenizer, train, settings, teacher=teacher_model,
                          on_step=lambda step, loss, seen: metrics.append(
                              json.dumps({"step": step, "loss": round(loss, 5), "target_tokens": seen})))
    after = heldout_loss(student, tokenizer, heldout)
    save_pair_run(student, tokenizer, out, metrics, overwrite=overwrite, remote_code=options.remote_code)
    return {"model": model, "data": data, "stage": "finetune", "pairs": len(train), "teacher": teacher, **summary,
            "heldout_loss_before": round(before, 4), "heldout_loss_after": round(after, 4), "out": out}


def distill_pairs(model: str, data: str, options, out: str, overwrite: bool) -> dict:
    """`t2r distill` on parallel data: attention transfer for a converted translation model (its feature maps learn
    to give each decoder self- and cross-attention's softmax output on the model's own inputs, teacher forcing;
    every other weight unchanged); written to `out` at the end (no checkpoints or --resume here)."""
    from ..train.checkpoint import check_run_dir
    from ..translation import transfer_attention

    check_run_dir(Path(out), resume=False, overwrite=overwrite)
    student, tokenizer = load_any(model, translation=True)
    train = load_pairs(data, "train")
    settings = pair_settings(options, lr=options.lr if "lr" in options.model_fields_set else 1e-2)
    metrics: list[str] = []
    summary = transfer_attention(student, tokenizer, train, settings, on_step=lambda step, loss, seen: metrics.append(
        json.dumps({"step": step, "transfer_mse": round(loss, 6), "target_tokens": seen})))
    save_pair_run(student, tokenizer, out, metrics, overwrite=overwrite, remote_code=options.remote_code)
    return {"model": model, "data": data, "stage": "distill", "pairs": len(train), **summary, "out": out}
