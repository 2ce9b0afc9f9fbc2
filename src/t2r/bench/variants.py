"""The faster ways to run the converted model that `t2r bench` can measure beside it (same weights, same process,
their decode steps interleaved with the original's and the float32 converted model's): int8 weights
(`t2r.quantize`), a compiled decode step (`t2r.step`), and both."""

from __future__ import annotations

import copy
import logging

from ..quantize import check_quantize, quantize
from ..step import compiled_decoder
from .settings import BenchSettings

log = logging.getLogger(__name__)


def build_variants(converted, options: BenchSettings) -> tuple[dict, list[str]]:
    """({name: model} of the variants `options` ask for, notes on what was built and what fell back)."""
    variants, notes = {}, []
    bases = {"converted": converted}
    if check_quantize(options.quantize) == "int8":
        log.info("bench: building the int8 converted model")
        variants["converted-int8"] = bases["converted-int8"] = quantize(copy.deepcopy(converted), "int8")
        notes.append("converted-int8: the converted model with every pretrained nn.Linear (projections, MLP, LM "
                     "head) as PyTorch's dynamically quantized int8 linear; feature maps and state float32")
    if options.compile:
        for name, model in bases.items():
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
