"""Smaller weights for CPU decode: every pretrained `nn.Linear` (projections, MLP, LM head) becomes a quantized linear,
applied at load time: int8 (`t2r.int8.Int8Linear`: int8 weights with per-output-channel scales, 8-bit activations
with one scale per token, and the few outlier input channels found on calibration tokens kept in float32) or fp16
(PyTorch's dynamically quantized linear with float16 weights, float32 activations).

What the conversion added (feature maps, mixer parameters) stays float32, and so does the recurrent state: the
state update and read-out run in float32 exactly as before. Only the matrix-vector products with the big pretrained
weights read a quarter (int8) or half (fp16) of the bytes, which is where a decode step spends most of its time.
PyTorch's plain int8 linear (one activation scale per call, outliers included) cost a trained converted SmolLM2 169%
of held-out perplexity; with per-token scales, 8-bit activations and float32 outliers it is 0.55% (docs/RESULTS.md,
issue 16).

Why this kernel: `benchmarks/quantize_kernels.py` on the 2-core EPYC VM at 1 thread, SmolLM2's shapes at batch 1:
PyTorch's `quantize_dynamic` linear (fbgemm/x86, per-channel int8 weights) took 0.4-0.5x the float32 time for the
MLP projections and under 0.1x for the 49152-row LM head, while torchao 0.18's int8 configs took 1-17x (without
`torch.compile` they dequantise in eager ops) and `torch._weight_int8pack_mm` 3-22x.

    model = t2r.load("runs/rnn"); quantize(model, "int8", tokenizer=tok)   # in place; returns the model
"""

from __future__ import annotations

import logging
import warnings

import torch
from torch import nn

from .attention import is_conversion_parameter
from .calibration import calibration_ids
from .errors import T2RError
from .int8 import Int8Linear, find_outliers

log = logging.getLogger(__name__)

QUANTIZE_MODES = ("none", "int8", "fp16")


def check_quantize(mode: str | None) -> str:
    """The mode as given, or a one-line error listing the known ones."""
    mode = mode or "none"
    if mode not in QUANTIZE_MODES:
        raise T2RError(f"--quantize is one of {', '.join(QUANTIZE_MODES)}, got {mode!r}")
    if mode != "none" and "fbgemm" not in torch.backends.quantized.supported_engines \
            and "x86" not in torch.backends.quantized.supported_engines:
        raise T2RError(f"--quantize {mode} needs PyTorch's fbgemm/x86 quantized engine, which this torch build lacks: "
                       "run without --quantize")
    return mode


def pretrained_linear_names(model: nn.Module) -> set[str]:
    """Names of the `nn.Linear` modules that hold pretrained weights (not feature maps or mixer parameters)."""
    return {name for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and not is_conversion_parameter(name + ".weight")}


def quantize(model: nn.Module, mode: str = "int8", *, tokenizer=None, calibration: torch.Tensor | None = None
             ) -> nn.Module:
    """Swap the pretrained linears of `model` (on the CPU, float32) for quantized ones, in place; "none" does nothing.

    int8: `t2r.int8.Int8Linear` (int8 GEMM, per-token activation scales); its outlier channels are found on
    `calibration` (token ids, (B, T)), else on t2r's built-in text through `tokenizer`; with neither, no channel is
    kept in float32 (a warning says what that costs). fp16: weights stored as float16, activations and accumulation
    float32 (fbgemm's fp16 GEMM): half the bytes, near lossless. Tied weights (an LM head sharing the embedding) are
    untied on the way: the head gets its own quantized copy and the embedding lookup stays float32. Records
    `model.config.t2r_quantize = mode`."""
    mode = check_quantize(mode)
    if mode == "none":
        return model
    param = next(model.parameters())
    if param.device.type != "cpu":
        raise T2RError(f"--quantize {mode} runs on the CPU only; the model is on {param.device}")
    if param.dtype != torch.float32:
        raise T2RError(f"--quantize {mode} starts from float32 weights; the model is {param.dtype}")
    names = pretrained_linear_names(model)
    if not names:
        raise T2RError(f"--quantize {mode}: the model has no nn.Linear layers to quantize")
    engine = "x86" if "x86" in torch.backends.quantized.supported_engines else "fbgemm"
    torch.backends.quantized.engine = engine
    if mode == "int8":
        outliers = _outliers(model, names, tokenizer, calibration)
        for name in names:
            model.set_submodule(name, Int8Linear(model.get_submodule(name), outliers.get(name)))
        log.info("quantized %d linear layers to int8 (%s engine; %d outlier input channels kept in float32)",
                 len(names), engine, sum(len(c) for c in outliers.values()))
    else:
        with warnings.catch_warnings():  # torch.ao.quantization announces its move to torchao on every call
            warnings.simplefilter("ignore")
            torch.ao.quantization.quantize_dynamic(model, {name: torch.ao.quantization.float16_dynamic_qconfig
                                                           for name in names}, dtype=torch.float16, inplace=True)
        log.info("quantized %d linear layers to fp16 (%s engine)", len(names), engine)
    model.config.t2r_quantize = mode
    return model


def _outliers(model: nn.Module, names: set[str], tokenizer, calibration) -> dict[str, torch.Tensor]:
    if calibration is None and tokenizer is not None:
        calibration = calibration_ids(tokenizer)
    if calibration is None:
        log.warning("--quantize int8 without calibration tokens: no outlier channel is kept in float32, which can "
                    "cost a language model much perplexity (pass tokenizer= or calibration=)")
        return {}
    return find_outliers(model, names, calibration)


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, (Int8Linear, torch.ao.nn.quantized.dynamic.Linear)) for m in model.modules())


def has_untraceable_linears(model: nn.Module) -> bool:
    """Whether PyTorch's dynamically quantized linears (fp16) are in `model`: torch.compile breaks its graph at each.
    t2r's int8 linear traces (one opaque op), the quantized module inside it included."""
    inner = {id(m.int8) for m in model.modules() if isinstance(m, Int8Linear)}
    return any(isinstance(m, torch.ao.nn.quantized.dynamic.Linear) and id(m) not in inner for m in model.modules())
