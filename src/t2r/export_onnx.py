"""`t2r export --onnx DIR`: a converted model as two ONNX graphs that carry the recurrent state in and out, for
runtimes outside Python's torch (onnxruntime here; `t2r.onnx_runner` generates from them with numpy alone).

    prefill.onnx  (input_ids [B, P], position_ids [B, P], state_0..n) -> (logits [B, V], state_0_out..n_out)
    step.onnx     (input_ids [B, 1], position_ids [B, 1], state_0..n) -> (logits [B, V], state_0_out..n_out)
    onnx_config.json  the state tensors' names, shapes (without the batch) and dtypes, P, the vocabulary, EOS ids
    tokenizer files   as `t2r convert` saved them

P is fixed (`prefill_chunk`): a prompt goes through prefill.onnx in pieces of P tokens and its remainder through
step.onnx, one token each. Both graphs are traced from `t2r.step.StateStep` (the chunked form for P tokens, the
recurrent form for one); the batch dimension is dynamic where every op allows it (`dynamic_batch` in the config; a
sliding window's prefill is batch 1). The state after no tokens is all zeros. With `int8`,
onnxruntime's dynamic int8 quantization of each graph is written beside it (`*.int8.onnx`).
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import torch

from .errors import T2RError
from .io import write_json
from .step import StateStep, compile_unavailable, zero_states

log = logging.getLogger(__name__)

CONFIG = "onnx_config.json"
GRAPHS = ("prefill", "step")


def require_onnx():
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        raise T2RError("--onnx needs onnx and onnxruntime: pip install 't2r[onnx]'") from None


def _export(step: StateStep, args: tuple, path: Path, state_names: list[str]) -> bool:
    """Trace `step` at `args` into `path`, the batch dimension dynamic where every op allows it (the sliding
    window's `unfold` does not: then batch 1). Returns whether the batch is dynamic."""
    names = ["input_ids", "position_ids", *state_names]
    outputs = ["logits", *(f"{n}_out" for n in state_names)]
    for dynamic in (True, False):
        axes = {n: {0: "batch"} for n in names + outputs} if dynamic else None
        try:
            with warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("ignore")  # the tracer's notes on shape checks it evaluated once
                torch.onnx.export(step, args, str(path), input_names=names, output_names=outputs, opset_version=17,
                                  dynamic_axes=axes, dynamo=False)
            return dynamic
        except torch.onnx.OnnxExporterError as err:
            if not dynamic:
                raise T2RError(f"ONNX export failed: {str(err).splitlines()[0]}") from None
            log.info("a dynamic batch does not export (%s); exporting batch 1", str(err).splitlines()[0][:120])
    return False


def export_onnx(model, out: str | Path, *, tokenizer=None, prefill_chunk: int = 64, int8: bool = False,
                overwrite: bool = False) -> dict:
    """Write the graphs, their config and the tokenizer to `out`; returns what was written."""
    require_onnx()
    reason = compile_unavailable(model)
    if reason and "C++ compiler" not in reason:
        raise T2RError(f"cannot export to ONNX: {reason}")
    if prefill_chunk < 1:
        raise T2RError(f"--prefill-chunk must be >= 1, got {prefill_chunk}")
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise T2RError(f"{out} is not empty: pass --overwrite or choose another directory")
    if next(model.parameters()).dtype != torch.float32:
        raise T2RError("ONNX export starts from float32 weights; load the model in float32")
    out.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    state, layout = zero_states(model, 1)
    state = [t.clone() for t in state]  # ordinary tensors for the tracer
    names = [f"state_{i}" for i in range(len(state))]
    step = StateStep(model, layout)
    files, dynamic_batch = {}, {}
    for graph, length in (("prefill", prefill_chunk), ("step", 1)):
        ids = torch.zeros(1, length, dtype=torch.long)
        pos = torch.arange(length)[None]  # (1, P)
        path = out / f"{graph}.onnx"
        log.info("exporting %s (%d tokens) to %s", graph, length, path)
        dynamic_batch[graph] = _export(step, (ids, pos, *state), path, names)
        files[graph] = path.name
        if int8:
            from onnxruntime.quantization import QuantType, quantize_dynamic

            quantized = out / f"{graph}.int8.onnx"
            quantize_dynamic(str(path), str(quantized), weight_type=QuantType.QInt8)
            files[f"{graph}_int8"] = quantized.name
    eos = getattr(model.generation_config, "eos_token_id", None) if hasattr(model, "generation_config") else None
    config = {"prefill_chunk": prefill_chunk, "vocab_size": int(model.config.get_text_config(decoder=True).vocab_size),
              "eos_token_id": eos, "files": files, "dynamic_batch": dynamic_batch,
              "states": [{"name": n, "shape": list(t.shape[1:]), "dtype": str(t.dtype).replace("torch.", "")}
                         for n, t in zip(names, state)],
              "recipe": model.config.t2r}
    write_json(out / CONFIG, config)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return {"out": str(out), **files, "states": len(names),
            "state_bytes_per_row": sum(t.numel() * t.element_size() for t in state)}
