"""The runtime a CPU user would pick, measured beside t2r: llama.cpp (through `llama-cpp-python`, the optional extra
`t2r[llamacpp]`) decoding the GGUF file itself, same threads, per context length: a real prefill of random tokens,
then timed one-token steps (`Llama.eval`). Without the package the bench records why and skips these rows."""

from __future__ import annotations

import logging
import statistics
import time
from pathlib import Path

import torch

from .settings import BenchSettings

log = logging.getLogger(__name__)

MISSING = ("llama.cpp rows skipped: llama-cpp-python is not installed (pip install 't2r[llamacpp]'; it builds "
           "llama.cpp from source, which can take an hour on a small machine)")


def kv_bytes(metadata: dict, context: int, bytes_per_value: int = 2) -> int | None:
    """llama.cpp's KV cache at `context` tokens from the GGUF metadata (its default f16 cache: 2 bytes a value)."""
    arch = metadata.get("general.architecture", "llama")
    try:
        layers = int(metadata[f"{arch}.block_count"])
        heads = int(metadata[f"{arch}.attention.head_count"])
        kv_heads = int(metadata.get(f"{arch}.attention.head_count_kv", heads))
        head_dim = int(metadata.get(f"{arch}.attention.key_length", int(metadata[f"{arch}.embedding_length"]) // heads))
    except (KeyError, ValueError):
        return None
    return 2 * layers * kv_heads * head_dim * context * bytes_per_value


def _load_llama():
    try:
        from llama_cpp import Llama
    except ImportError:
        return None
    return Llama


def llamacpp_rows(gguf: str, options: BenchSettings, threads: int | None = None) -> dict:
    """{"rows": [...], "note": ...}: llama.cpp's decode ms/token, prefill tokens/s and KV bytes per context (batch
    1), or {"rows": [], "skipped": why} when llama-cpp-python is missing or the file is not there."""
    if not Path(gguf).is_file():
        return {"rows": [], "skipped": f"llama.cpp rows skipped: {gguf!r} is not a GGUF file"}
    Llama = _load_llama()
    if Llama is None:
        return {"rows": [], "skipped": MISSING}
    threads = threads or torch.get_num_threads()
    rows, rate = [], None
    for context in options.contexts:
        if rate and context / rate > options.prefill_cap_s:
            rows.append({"model": "llama.cpp", "context": context, "batch": 1, "decode_ms_per_token": None,
                         "skipped": f"prefill predicted {context / rate:.0f} s > prefill cap {options.prefill_cap_s:.0f} s"})
            continue
        llm = Llama(model_path=str(gguf), n_ctx=context + options.warmup + options.decode_tokens + 8,
                    n_threads=threads, n_threads_batch=threads, n_batch=512, verbose=False)
        gen = torch.Generator().manual_seed(context)
        vocab = llm.n_vocab()
        prompt = torch.randint(0, vocab, (context,), generator=gen).tolist()
        start = time.perf_counter()
        llm.eval(prompt)
        prefill_s = time.perf_counter() - start
        rate = context / prefill_s
        times = []  # fed random tokens: a step's cost does not depend on which token it is
        for token in torch.randint(0, vocab, (options.warmup + options.decode_tokens,), generator=gen).tolist():
            start = time.perf_counter()
            llm.eval([token])
            times.append(time.perf_counter() - start)
        ms = statistics.median(times[options.warmup:]) * 1e3
        rows.append({"model": "llama.cpp", "context": context, "batch": 1, "decode_ms_per_token": ms,
                     "decode_tokens_per_s": 1e3 / ms, "decode_steps": options.decode_tokens,
                     "prefill_tokens_per_s": rate, "prefill_seconds": prefill_s,
                     "cache_bytes": kv_bytes(llm.metadata, context)})
        log.info("llama.cpp context %d: %.1f ms/token, prefill %.0f tokens/s", context, ms, rate)
        del llm
    return {"rows": rows, "threads": threads, "gguf": str(gguf),
            "note": "llama.cpp through llama-cpp-python on the GGUF file as it is (its own quantization), batch 1, "
                    "same threads; measured after the torch rows, not interleaved; cache_bytes: its f16 KV cache "
                    "computed from the GGUF metadata"}
