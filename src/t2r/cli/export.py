"""`t2r export`: a converted model out of Python's torch (ONNX graphs with the state in and out)."""

from __future__ import annotations

from ..errors import T2RError
from .models import load_converted


def export_command(model: str, *, onnx: str | None = None, prefill_chunk: int = 64, onnx_int8: bool = False,
                   overwrite: bool = False, as_json: bool = False) -> dict:
    """Export a converted model: `--onnx DIR` writes prefill.onnx and step.onnx (state in, state out), their config
    and the tokenizer; `python -m t2r.onnx_runner DIR` generates from them with onnxruntime.

    Args:
        model: directory of a converted model (from `t2r convert`); every layer linear, llama family.
        onnx: directory to write the ONNX graphs to.
        prefill_chunk: tokens per call of the prefill graph (a prompt's remainder goes through the step graph).
        onnx_int8: also write onnxruntime's dynamic int8 quantization of both graphs (*.int8.onnx).
        overwrite: write into --onnx even if it is not empty.
        as_json: print the result as JSON.
    """
    if not onnx:
        raise T2RError("say where to write: --onnx DIR (the only export format so far)")
    from ..export_onnx import export_onnx

    hf_model, tokenizer = load_converted(model, need_tokenizer=False)
    return export_onnx(hf_model, onnx, tokenizer=tokenizer, prefill_chunk=prefill_chunk, int8=onnx_int8,
                       overwrite=overwrite)
