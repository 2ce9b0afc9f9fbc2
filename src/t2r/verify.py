"""The RNN claim, checked on a model: the parallel (quadratic), chunked and recurrent forms give the same logits,
and a left-padded batch gives each row the logits it gets alone.

The check runs twice: in float64 on a copy of the model, where the forms must agree to 1e-6 (the math is the same),
and in the model's own dtype, where rounding differences grow through the layers (about 1e-4 relative on the
30-layer SmolLM2 in float32) and a looser bound catches numerically unstable paths.

The bound in the model's dtype follows the dtype. float32: 1e-3. bfloat16 / float16 (8 / 11 mantissa bits): the
forms round differently at every layer (the recurrent state is float32, but what each layer hands the next is
rounded to 16 bits), and those differences grow through the depth as the dtype's own rounding error does. So the
bound is the larger of 3e-2 and twice the error the dtype itself makes on this model: the relative difference
between the model's full forward and the same forward of a float32 copy (`dtype_rounding_error` in the report). A
form whose error exceeds what the dtype costs anyway is numerically unstable; one within it is rounding. Where that
rounding error itself passes COARSE (0.25, three times what bfloat16 costs the original SmolLM2-135M on this check,
0.08; a freshly converted SmolLM2 differs from its float32 self by 2.2 in bfloat16 and 0.29 in float16 on random
tokens, each layer amplifying the rounding), the report says the dtype is too coarse for the model
(`dtype_too_coarse`): its forms agree as far as the dtype can tell, and the float64 run carries the check.

The model is checked in eval mode (dropout off: GPT-2's would make two forward passes differ) and left in the mode it
was in."""

from __future__ import annotations

import copy

import torch

from .adapters import is_converted
from .errors import T2RError
from .generate import check_positions, new_cache

EXACT_TOLERANCE = 1e-6  # float64
TOLERANCES = {torch.float64: EXACT_TOLERANCE, torch.float32: 1e-3, torch.bfloat16: 3e-2, torch.float16: 3e-2}
HALF_DTYPES = (torch.bfloat16, torch.float16)
ROUNDING_FACTOR = 2.0  # a 16-bit model's bound: this many times the dtype's own error on the model (see above)
COARSE = 0.25  # a dtype whose own error on the model is above this is too coarse to run it (see above)
CHECKS = ("chunk_vs_quadratic", "recurrent_vs_full", "padded_vs_alone")


MAX_WEIGHT_MAGNITUDE = 1e10  # far above any trained LM's weights; a flipped exponent bit gives ~1e36


def check_weights(model) -> None:
    """Refuse a model with a NaN, an infinity or an implausibly large value (|w| > 1e10: a flipped exponent bit) in
    any weight, naming the first such tensor: such a model computes garbage or overflows, silently."""
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        tensor = tensor.detach()
        if not tensor.is_floating_point() or tensor.numel() == 0:
            continue
        finite = torch.isfinite(tensor)
        if not bool(finite.all()):
            nan = int(torch.isnan(tensor).sum())
            raise T2RError(f"weight {name} has {nan} NaN and {int((~finite).sum()) - nan} infinite values: the model "
                           "files are damaged or a run diverged; use an earlier checkpoint or convert again")
        peak = float(tensor.abs().max())
        if peak > MAX_WEIGHT_MAGNITUDE:
            raise T2RError(f"weight {name} holds a value of magnitude {peak:.3g} (> {MAX_WEIGHT_MAGNITUDE:.0e}): the "
                           "model files are damaged (e.g. a flipped bit); download or convert them again")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest per-position relative error ||a_t - b_t|| / ||b_t|| over the last axis."""
    num = (a.double() - b.double()).norm(dim=-1)
    den = b.double().norm(dim=-1).clamp_min(1e-30)
    return float((num / den).max()) if num.numel() else 0.0


def _positions(mask: torch.Tensor) -> torch.Tensor:
    return (mask.long().cumsum(-1) - 1).clamp_min(0)  # what HF generate uses for left padding


def _forward(model, ids, mask, **kwargs):
    return model(input_ids=ids, attention_mask=mask, position_ids=_positions(mask), **kwargs).logits


def _stepwise(model, ids, mask, prefill: int) -> torch.Tensor:
    """Chunked prefill of `prefill` tokens, then one token at a time, carrying the recurrent state."""
    cache = new_cache(model)
    pos = _positions(mask)
    out = [model(input_ids=ids[:, :prefill], attention_mask=mask[:, :prefill], position_ids=pos[:, :prefill],
                 cache=cache, use_cache=True).logits]
    for t in range(prefill, ids.shape[1]):
        out.append(model(input_ids=ids[:, t:t + 1], attention_mask=mask[:, :t + 1], position_ids=pos[:, t:t + 1],
                         cache=cache, use_cache=True).logits)
    return torch.cat(out, dim=1)


def _errors(model, ids, mask, prefill: int, pad: int) -> dict:
    valid = mask.bool()
    chunk = _forward(model, ids, mask, use_cache=False)
    quadratic = _forward(model, ids, mask, use_cache=False, t2r_mode="quadratic")
    stepwise = _stepwise(model, ids, mask, prefill)
    alone = _forward(model, ids[1:, pad:], mask[1:, pad:], use_cache=False)
    finite = bool(torch.isfinite(chunk[valid]).all() and torch.isfinite(stepwise[valid]).all())
    errs = dict(zip(CHECKS, (rel_err(chunk[valid], quadratic[valid]), rel_err(stepwise[valid], chunk[valid]),
                             rel_err(chunk[1, pad:], alone[0]))))
    return {k: (v if finite else float("inf")) for k, v in errs.items()}


def verify(model, *, tokens: int = 100, prefill: int = 67, pad: int = 5, seed: int = 0, exact: bool = True) -> dict:
    """Parity checks on random token ids (batch of 2, row 1 left-padded by `pad`): the quadratic reference vs the
    chunked form, chunked prefill + token-by-token decoding vs the full forward, a padded row vs the row alone.
    `exact` adds the float64 run. Returns a JSON-able report with `ok` and every relative error. Runs in eval mode;
    the model is left in the mode it was in."""
    was_training = model.training
    model.eval()
    try:
        return _verify(model, tokens=tokens, prefill=prefill, pad=pad, seed=seed, exact=exact)
    finally:
        model.train(was_training)


@torch.inference_mode()
def _verify(model, *, tokens: int, prefill: int, pad: int, seed: int, exact: bool) -> dict:
    if not is_converted(model):
        raise T2RError("verify needs a converted model (run `t2r convert` first)")
    if not 1 <= prefill < tokens or not 0 <= pad < tokens:
        raise T2RError(f"need 1 <= prefill < tokens and 0 <= pad < tokens; got {prefill=}, {tokens=}, {pad=}")
    check_positions(model, tokens, f"verify of {tokens} tokens", "check fewer --tokens")
    gen = torch.Generator().manual_seed(seed)
    vocab = model.config.get_text_config(decoder=True).vocab_size
    param = next(model.parameters())
    ids = torch.randint(0, vocab, (2, tokens), generator=gen).to(param.device)
    mask = torch.ones_like(ids)
    mask[1, :pad] = 0

    tol = TOLERANCES.get(param.dtype, 3e-2)
    report = {"tokens": tokens, "prefill": prefill, "padding": pad, "dtype": str(param.dtype).replace("torch.", "")}
    if param.dtype in HALF_DTYPES:
        rounding = rel_err(_forward(model, ids, mask, use_cache=False)[mask.bool()],
                           _forward(copy.deepcopy(model).float(), ids, mask, use_cache=False)[mask.bool()])
        report.update(dtype_rounding_error=rounding, rounding_factor=ROUNDING_FACTOR,
                      dtype_too_coarse=rounding > COARSE)
        tol = max(tol, ROUNDING_FACTOR * rounding)
    report["tolerance"] = tol
    ok = True
    for name, err in _errors(model, ids, mask, prefill, pad).items():
        report[f"max_rel_err_{name}"] = err
        ok &= err < tol
    if exact and param.dtype != torch.float64:
        report["exact_tolerance"] = EXACT_TOLERANCE
        for name, err in _errors(copy.deepcopy(model).double(), ids, mask, prefill, pad).items():
            report[f"float64_max_rel_err_{name}"] = err
            ok &= err < EXACT_TOLERANCE
    report["ok"] = bool(ok)
    return report
