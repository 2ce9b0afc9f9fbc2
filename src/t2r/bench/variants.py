"""The faster ways to run the converted model that `t2r bench` can measure beside it (same weights, same process,
their decode steps interleaved with the original's and the float32 converted model's): int8 or fp16 weights
(`t2r.quantize`) and a compiled decode step (`t2r.step`) of the float32 and the int8 model. fp16 models are not
compiled: dynamo cannot trace PyTorch's fp16 linear (a graph break in every layer; slower than eager here); t2r's
int8 linear goes through the graph as one custom op."""

from __future__ import annotations

import copy
import logging

from ..quantize import check_quantize, quantize
from ..step import compiled_decoder
from .settings import BenchSettings

log = logging.getLogger(__name__)


def build_variants(converted, options: BenchSettings, tokenizer=None) -> tuple[dict, list[str]]:
    """({name: model} of the variants `options` ask for, notes on what was built and what fell back); `tokenizer`
    encodes int8's calibration text."""
    variants, notes = {}, []
    for mode in [check_quantize(m.strip()) for m in options.quantize.split(",") if m.strip() != "none"]:
        log.info("bench: building the %s converted model", mode)
        name = f"converted-{mode}"
        variants[name] = quantize(copy.deepcopy(converted), mode, tokenizer=tokenizer)
        kind = ("int8 linear (per-token activation scales, outlier channels float32)" if mode == "int8" else
                "PyTorch's dynamically quantized fp16 linear")
        notes.append(f"{name}: the converted model with every pretrained nn.Linear (projections, MLP, LM head) as "
                     f"t2r.quantize's {kind}; feature maps and state float32")
    if options.compile:  # dynamo cannot trace fp16's quantized linears (a graph break per layer): float32 and int8
        for name, model in {"converted": converted, **{n: m for n, m in variants.items() if n.endswith("int8")}}.items():
            log.info("bench: compiling the decode step of %s", name)
            built = compiled_decoder(model)
            if built.compiled:
                variants[f"{name}-compiled"] = built.model
                notes.append(f"{name}-compiled: its one-token step compiled by torch.compile (inductor), "
                             f"{built.compile_seconds:.0f} s to compile at batch 1 (other batch sizes recompile "
                             "during warm-up)")
            else:
                notes.append(f"{name}-compiled: not measured: {built.reason}")
    return variants, notes
