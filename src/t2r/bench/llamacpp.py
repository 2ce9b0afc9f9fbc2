"""The runtime a CPU user would pick, measured beside t2r: llama.cpp (through `llama-cpp-python`, the optional extra
`t2r[llamacpp]`) decoding the GGUF file itself, same threads, per context length: a real prefill of random tokens,
then one-token steps (`Llama.eval`). `t2r bench` steps it in turn with the torch models (`LlamaCpp.steps`), so its
row of a context is measured under the same load as theirs. Without the package the bench records why and skips it."""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from .settings import BenchSettings

log = logging.getLogger(__name__)

NAME = "llama.cpp"
MISSING = ("llama.cpp rows skipped: llama-cpp-python is not installed (pip install 't2r[llamacpp]'; it builds "
           "llama.cpp from source: 6 minutes on an idle 2-core machine, much longer on a busy one)")
ALONE = ("llama.cpp through llama-cpp-python on the GGUF file as it is (its own quantization), batch 1, same "
         "threads; cache_bytes: its f16 KV cache computed from the GGUF metadata")
NOTE = ALONE + "; its steps alternate with the torch models' steps of the same context"  # in `t2r bench`


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


class LlamaCpp:
    """llama.cpp on one GGUF at batch 1: `prefill(length)` builds a fresh context holding `length` random tokens,
    `steps(n)` then yields after each of n one-token evaluations."""

    def __init__(self, Llama, gguf: str, options: BenchSettings, threads: int) -> None:
        self.Llama, self.gguf, self.options, self.threads = Llama, str(gguf), options, threads
        self.llm, self.length, self.rate = None, 0, None

    def predicted_seconds(self, length: int) -> float | None:
        return length / self.rate if self.rate else None

    def prefill(self, length: int) -> dict:
        """Prefill `length` tokens, or skip the context when the last prefill's rate predicts more than the cap.
        Returns the row's prefill fields (`skipped` set when skipped)."""
        predicted = self.predicted_seconds(length)
        self.close()
        cap = self.options.llamacpp_prefill_cap_s
        if predicted is not None and predicted > cap:
            return {"skipped": f"prefill predicted {predicted:.0f} s > --llamacpp-prefill-cap-s {cap:.0f}"}
        o = self.options
        self.llm = self.Llama(model_path=self.gguf, n_ctx=length + o.warmup + o.decode_tokens + 8,
                              n_threads=self.threads, n_threads_batch=self.threads, n_batch=512, verbose=False)
        gen = torch.Generator().manual_seed(length)
        prompt = torch.randint(0, self.llm.n_vocab(), (length,), generator=gen).tolist()
        start = time.perf_counter()
        self.llm.eval(prompt)
        seconds = time.perf_counter() - start
        self.length, self.rate = length, length / seconds
        log.info("llama.cpp context %d: prefill %.0f tokens/s", length, self.rate)
        return {"prefill_tokens_per_s": self.rate, "prefill_seconds": seconds, "cache_fill": "real prefill"}

    def steps(self, n: int) -> Iterator[None]:
        """n one-token steps, each fed a random token (a step's cost does not depend on which token it is)."""
        gen = torch.Generator().manual_seed(self.length + 1)
        for token in torch.randint(0, self.llm.n_vocab(), (n,), generator=gen).tolist():
            self.llm.eval([token])
            yield

    def cache_bytes(self) -> int | None:
        return kv_bytes(self.llm.metadata, self.length) if self.llm is not None else None

    def close(self) -> None:
        self.llm = None  # llama-cpp-python frees its context when the object goes


def open_llamacpp(gguf: str, options: BenchSettings, threads: int | None = None) -> tuple[LlamaCpp | None, str]:
    """(the runner, "") or (None, why its rows are skipped): llama-cpp-python missing or the file not there."""
    if not Path(gguf).is_file():
        return None, f"llama.cpp rows skipped: {gguf!r} is not a GGUF file"
    Llama = _load_llama()
    if Llama is None:
        return None, MISSING
    return LlamaCpp(Llama, gguf, options, threads or torch.get_num_threads()), ""


def row(runner: LlamaCpp, context: int, prefill: dict, times: list[float] | None,
        cpu: list[float] | None = None) -> dict:
    """The llama.cpp row of `context` from its prefill fields and its timed steps (None: skipped), wall and (where
    measured) process CPU seconds."""
    if times is None:
        return {"model": NAME, "context": context, "batch": 1, "decode_ms_per_token": None, **prefill}
    ms = statistics.median(times) * 1e3
    out = {"model": NAME, "context": context, "batch": 1, "decode_ms_per_token": ms, "decode_tokens_per_s": 1e3 / ms,
           "decode_steps": len(times), "decode_ms_min": min(times) * 1e3, "decode_ms_max": max(times) * 1e3}
    if cpu:
        out["decode_cpu_ms_per_token"] = statistics.median(cpu) * 1e3
    return {**out, **prefill, "cache_bytes": runner.cache_bytes()}


def timed(steps: Iterator) -> tuple[list[float], list[float]]:
    """Wall and process CPU seconds of each step of `steps`."""
    times, cpu, done = [], [], object()
    while True:
        start, start_cpu = time.perf_counter(), time.process_time()
        if next(steps, done) is done:
            return times, cpu
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)


def llamacpp_rows(gguf: str, options: BenchSettings, threads: int | None = None) -> dict:
    """llama.cpp alone (not interleaved with anything): {"rows": [...], "threads", "gguf", "note"}, or
    {"rows": [], "skipped": why}."""
    runner, skipped = open_llamacpp(gguf, options, threads)
    if runner is None:
        return {"rows": [], "skipped": skipped}
    rows = []
    for context in options.contexts:
        prefill = runner.prefill(context)
        if "skipped" in prefill:
            rows.append(row(runner, context, prefill, None))
            continue
        times, cpu = timed(runner.steps(options.warmup + options.decode_tokens))
        rows.append(row(runner, context, prefill, times[options.warmup:], cpu[options.warmup:]))
    runner.close()
    return {"rows": rows, "threads": runner.threads, "gguf": str(gguf), "note": ALONE}
