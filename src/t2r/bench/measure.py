"""Speed and memory of a converted model against its original (same weights, dtype, threads, one process).

Per context length and batch size: decode ms/token (median of timed steps of the lean loop `t2r.decode`, the two
models' steps interleaved), prefill tokens/s (a real batch-1 prefill in pieces of `prefill_chunk` tokens carrying the
cache, where it fits a time cap), cache/state bytes and
the process's peak RSS; plus the weight-reading floor (one matrix-vector pass over every weight matrix), the
training-step throughput (forward + backward) and the per-token overhead of HF `generate()` over the lean loop.

A long context needs a cache but not a quadratic prefill for every row: each model's cache at context L is its real
batch-1 prefill of L tokens where that fits `prefill_cap_s`; otherwise the longest real prefill is extended to L
(softmax keys/values tiled along the sequence, a recurrent state kept with its token count set to L: the decode cost
of a step does not depend on what the cached values are). A batch of B repeats the batch-1 cache B times.

The ratios, the table and the plot of a result: `t2r.bench.report`.
"""

from __future__ import annotations

import copy
import gc
import logging
import os
import platform
import resource
import statistics
import time
from pathlib import Path

import torch
import transformers

from ..adapters import adapter_for, cache_bytes, original_model
from ..budget import kv_cache_bytes, require_memory
from ..decode import decode, iter_decode
from ..generate import new_cache
from . import llamacpp
from .llamacpp import LlamaCpp, open_llamacpp
from .report import ratios
from .settings import BenchSettings
from .variants import build_variants

log = logging.getLogger(__name__)


def peak_rss_bytes() -> int:
    """This process's peak resident set size so far (monotone: it never goes down)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def rss_bytes() -> int | None:
    try:
        import psutil
    except ImportError:
        return None
    return psutil.Process().memory_info().rss


def machine_info(device: torch.device) -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    info = {"cpu": cpu, "cpu_count": os.cpu_count(), "platform": platform.platform(), "device": str(device)}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


class Clock:
    """Wall time that waits for the device's queued work first."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __call__(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()


# --- caches -------------------------------------------------------------------------------------------------------

def copy_cache(cache, batch: int = 1):
    """An independent copy of `cache` with every row repeated `batch` times."""
    with torch.inference_mode():
        out = copy.deepcopy(cache)
        if batch > 1:
            out.batch_repeat_interleave(batch)
    return out


def own_weights(model):
    """Copy every parameter into memory of the process's own. A model loaded from safetensors keeps its weights in
    a private map of the file, whose pages the kernel may drop under memory pressure and read back later (and which
    get no transparent huge pages); the original, built by copying, has neither. Both get the same footing."""
    with torch.no_grad():
        for param in model.parameters():  # tied weights are one Parameter: copied once, still tied
            param.data = param.data.clone()
    return model


# --- measurements -------------------------------------------------------------------------------------------------

@torch.inference_mode()
def weight_floor_ms(model, device: torch.device, repeats: int = 7) -> float:
    """Median time of one matrix-vector product with every weight matrix of `model` (each tensor once)."""
    weights = {id(m.weight): m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)}
    weights.update({id(p): p for n, p in model.named_parameters() if p.dim() == 2 and "embed" in n})
    vectors = {w.shape[1]: torch.randn(1, w.shape[1], dtype=w.dtype, device=device) for w in weights.values()}
    clock, times = Clock(device), []
    for _ in range(repeats + 1):
        start = clock()
        for w in weights.values():
            torch.nn.functional.linear(vectors[w.shape[1]], w)  # (1, out)
        times.append(clock() - start)
    return statistics.median(times[1:]) * 1e3


@torch.inference_mode()
def prefill(model, ids: torch.Tensor, device: torch.device, chunk: int | None = None, budget_s: float = 1.0,
            max_runs: int = 3):
    """Real prefill of `ids` ([1, L]) into a fresh cache, one forward per `chunk` tokens (None: one forward);
    repeated while cheap. Returns (median wall seconds, median process CPU seconds, cache)."""
    clock, times, cpu, cache = Clock(device), [], [], None
    step = chunk or ids.shape[1]
    while not times or (sum(times) < budget_s and len(times) < max_runs):
        cache = new_cache(model)
        start, start_cpu = clock(), time.process_time()
        for piece in ids.split(step, dim=1):
            model(input_ids=piece, cache=cache, use_cache=True, logits_to_keep=1)
        times.append(clock() - start)
        cpu.append(time.process_time() - start_cpu)
    return statistics.median(times), statistics.median(cpu), cache


def predict_seconds(history: list[tuple[int, float]], length: int) -> float | None:
    """Prefill time at `length` from earlier (length, seconds): a t = a L + b L^2 fit through the last two points
    (a, b >= 0), or linear growth from a single point (short prefills are dominated by their linear part)."""
    if not history:
        return None
    (l1, t1) = history[-1]
    if len(history) == 1:
        return t1 * length / l1
    (l0, t0) = history[-2]
    b = max((t1 / l1 - t0 / l0) / (l1 - l0), 0.0)
    a = max(t1 / l1 - b * l1, 0.0)
    return a * length + b * length ** 2


def interleaved_decode(models: dict, caches: dict, *, batch: int, steps: int, warmup: int,
                       device: torch.device, vocab: int, cap_s: float | None = None,
                       external: dict | None = None) -> tuple[dict, int]:
    """Decode `warmup + steps` greedy tokens with each model from its cache, one step of each in turn; `external`
    ({name: iterator}) adds other runtimes' steps to the turn (one `next` each: llama.cpp).

    With `cap_s`, the steps are cut (to no fewer than 8) when the first warm-up step says the row would take longer.
    Returns ({name: [wall seconds per timed step]}, {name: [process CPU seconds per timed step]}, steps timed)."""
    gen = torch.Generator().manual_seed(1)
    start_ids = torch.randint(0, vocab, (batch, 1), generator=gen).to(device)
    loops = {n: iter_decode(models[n], start_ids, cache=caches[n], max_new_tokens=warmup + steps + 1)
             for n in models}
    loops.update(external or {})
    clock, times, cpu = Clock(device), {n: [] for n in loops}, {n: [] for n in loops}
    total = warmup + steps
    for i in range(total):
        for name, loop in loops.items():
            start, start_cpu = clock(), time.process_time()
            next(loop)
            times[name].append(clock() - start)
            cpu[name].append(time.process_time() - start_cpu)
        if i == 0 and cap_s is not None:
            per_step = sum(t[0] for t in times.values())
            if per_step * total > cap_s:
                total = warmup + max(8, min(steps, int(cap_s / per_step) - warmup))
    for loop in loops.values():
        loop.close()
    return {n: t[warmup:] for n, t in times.items()}, {n: t[warmup:] for n, t in cpu.items()}, total - warmup


def train_tokens_per_s(models: dict, *, seq: int, steps: int, device: torch.device, vocab: int) -> dict:
    """Forward + backward (full model, loss on next-token prediction) at batch 1, seq `seq`; interleaved."""
    ids = torch.randint(0, vocab, (1, seq), generator=torch.Generator().manual_seed(2)).to(device)
    clock, times = Clock(device), {n: [] for n in models}
    for _ in range(steps + 1):
        for name, model in models.items():
            model.train()
            start = clock()
            model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
            times[name].append(clock() - start)
            model.zero_grad(set_to_none=True)
            model.eval()
    return {n: seq / statistics.median(t[1:]) for n, t in times.items()}


def generate_overhead(models: dict, *, context: int, tokens: int, device: torch.device, vocab: int,
                      repeats: int = 3) -> dict:
    """ms/token of HF `generate()` and of the lean `decode` (batch 1, greedy) from the difference between
    generating tokens + 1 and 1 token (so the prefill cancels out); medians over interleaved repeats."""
    ids = torch.randint(0, vocab, (1, context), generator=torch.Generator().manual_seed(3)).to(device)
    mask = torch.ones_like(ids)
    clock = Clock(device)

    def hf(model, n):
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=mask, cache=new_cache(model), max_new_tokens=n,
                                 do_sample=False, pad_token_id=0)
        return out.shape[1] - context

    def lean(model, n):
        return decode(model, ids, max_new_tokens=n)[0].shape[1]

    results = {n: {"hf_generate": [], "lean_decode": []} for n in models}
    for _ in range(repeats):
        for name, model in models.items():
            for kind, run in (("hf_generate", hf), ("lean_decode", lean)):
                start = clock()
                made = run(model, tokens + 1)
                long_s = clock() - start
                start = clock()
                run(model, 1)
                results[name][kind].append((long_s - (clock() - start)) / max(made - 1, 1))
    out = {"context": context, "batch": 1, "tokens": tokens}
    for name, kinds in results.items():
        hf_ms, lean_ms = (statistics.median(kinds[k]) * 1e3 for k in ("hf_generate", "lean_decode"))
        out[name] = {"hf_generate_ms_per_token": hf_ms, "lean_decode_ms_per_token": lean_ms,
                     "saved_ms_per_token": hf_ms - lean_ms}
    return out


# --- the run ------------------------------------------------------------------------------------------------------

def _prepare_context(models: dict, sources: dict, history: dict, length: int, *, device, vocab: int,
                     cap_s: float, chunk: int | None) -> tuple[dict, dict]:
    """Each model's batch-1 cache at `length` (real prefill if it fits the cap) and its prefill figures."""
    ids = torch.randint(0, vocab, (1, length), generator=torch.Generator().manual_seed(length)).to(device)
    caches, info = {}, {}
    for name, model in models.items():
        predicted = predict_seconds(history[name], length)
        if sources[name] is None or predicted <= cap_s:
            seconds, cpu_seconds, cache = prefill(model, ids, device, chunk)
            history[name].append((length, seconds))
            sources[name] = (length, cache)
            info[name] = {"prefill_tokens_per_s": length / seconds, "prefill_seconds": seconds,
                          "prefill_cpu_seconds": cpu_seconds, "cache_fill": "real prefill"}
        else:
            source_len, source = sources[name]
            cache = adapter_for(model).extend_cache(source, length)
            info[name] = {"prefill_tokens_per_s": None, "prefill_seconds": None, "prefill_cpu_seconds": None,
                          "prefill_skipped": f"predicted {predicted:.0f} s > prefill cap {cap_s:.0f} s",
                          "cache_fill": f"real {source_len}-token prefill extended to {length} tokens"}
        caches[name] = cache
    return caches, info


def measure_rows(models: dict, options: BenchSettings, *, device: torch.device, vocab: int,
                 llama: LlamaCpp | None = None) -> list[dict]:
    """One row per (model, context, batch); contexts ascending so each real prefill can seed the next ones. With
    `llama`, a llama.cpp row per context too, its steps in turn with the batch-1 steps of the models."""
    sources, history, rows = {n: None for n in models}, {n: [] for n in models}, []
    for length in options.contexts:
        caches, info = _prepare_context(models, sources, history, length, device=device, vocab=vocab,
                                        cap_s=options.prefill_cap_s, chunk=options.prefill_chunk or None)
        log.info("context %d: prefill %s", length, {n: i["prefill_seconds"] for n, i in info.items()})
        llama_prefill = llama.prefill(length) if llama else {"skipped": ""}
        for batch in options.batch:
            external = {} if batch != 1 or "skipped" in llama_prefill else {
                llamacpp.NAME: llama.steps(options.warmup + options.decode_tokens + 1)}
            row_caches = {n: copy_cache(caches[n], batch) for n in models}
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            times, cpu, steps = interleaved_decode(models, row_caches, batch=batch, steps=options.decode_tokens,
                                                   warmup=options.warmup, device=device, vocab=vocab,
                                                   cap_s=options.decode_cap_s, external=external)
            if llama and batch == 1:
                rows.append(llamacpp.row(llama, length, llama_prefill, times.get(llamacpp.NAME), cpu.get(llamacpp.NAME)))
            for name in models:
                ms = statistics.median(times[name]) * 1e3
                row = {"model": name, "context": length, "batch": batch, "decode_ms_per_token": ms,
                       "decode_tokens_per_s": batch * 1e3 / ms, "decode_steps": steps,
                       "decode_ms_min": min(times[name]) * 1e3, "decode_ms_max": max(times[name]) * 1e3,
                       "decode_cpu_ms_per_token": statistics.median(cpu[name]) * 1e3,
                       **info[name], "cache_bytes": cache_bytes(row_caches[name]),
                       "peak_rss_bytes": peak_rss_bytes(), "rss_bytes": rss_bytes()}
                if device.type == "cuda":
                    row["device_peak_bytes"] = torch.cuda.max_memory_allocated(device)
                rows.append(row)
            log.info("context %d batch %d: %s ms/token", length, batch,
                     {n: round(statistics.median(t) * 1e3, 2) for n, t in times.items()})
            del row_caches
            gc.collect()
        del caches
    return rows


def run_bench(converted, options: BenchSettings = BenchSettings(), *, device: str | torch.device = "cpu",
              tokenizer=None) -> dict:
    """Measure `converted` against `original_model(converted)` as `options` say; returns the JSON-able result (see
    the module doc). `tokenizer` encodes int8's calibration text (`t2r.quantize`)."""
    device = torch.device(device)
    converted = own_weights(converted.to(device).eval())
    models = {"original": original_model(converted).eval(), "converted": converted}
    variants, variant_notes = build_variants(converted, options, tokenizer=tokenizer)
    vocab = converted.config.get_text_config(decoder=True).vocab_size
    param = next(converted.parameters())
    context, batch = max(options.contexts), max(options.batch)
    require_memory(kv_cache_bytes(converted.config, context, batch, param.element_size()),
                   f"the original model's KV cache at context {context} x batch {batch}",
                   "choose smaller --contexts or --batch", device=str(device))
    result = {"machine": machine_info(device), "torch": torch.__version__, "transformers": transformers.__version__,
              "threads": torch.get_num_threads(), "dtype": str(param.dtype).replace("torch.", ""),
              "model": getattr(converted.config, "_name_or_path", ""), "recipe": converted.config.t2r,
              "contexts": options.contexts, "batches": options.batch, "decode_tokens": options.decode_tokens,
              "warmup": options.warmup, "prefill_cap_s": options.prefill_cap_s, "decode_cap_s": options.decode_cap_s,
              "prefill_chunk": options.prefill_chunk or None,
              "load_average_start": os.getloadavg()}  # other processes on the machine skew every timing
    log.info("weight floor")
    result["weight_floor_ms"] = weight_floor_ms(models["original"], device)
    if options.generate_tokens > 0:
        log.info("HF generate vs the lean decode loop at context %d", options.contexts[0])
        result["generate_loop"] = generate_overhead(dict(models), context=options.contexts[0],
                                                    tokens=options.generate_tokens, device=device, vocab=vocab)
    llama, skipped = open_llamacpp(options.llamacpp, options) if options.llamacpp else (None, "")
    if llama and 1 not in options.batch:
        llama, skipped = None, "llama.cpp rows skipped: they are batch 1, and --batch does not include 1"
    rows = measure_rows({**models, **variants}, options, device=device, vocab=vocab, llama=llama)
    result["rows"] = [r for r in rows if r["model"] != llamacpp.NAME]
    if llama:
        llama.close()
    if options.llamacpp:
        result["llamacpp"] = ({"rows": [r for r in rows if r["model"] == llamacpp.NAME], "threads": llama.threads,
                               "gguf": options.llamacpp, "note": llamacpp.NOTE} if llama else
                              {"rows": [], "skipped": skipped})
    result["ratios"] = ratios(result["rows"])
    if options.train_steps > 0:
        log.info("training step throughput at seq %d", options.train_seq)
        result["train_tokens_per_s"] = {"seq": options.train_seq, "batch": 1, **train_tokens_per_s(
            models, seq=options.train_seq, steps=options.train_steps, device=device, vocab=vocab)}
    result["load_average_end"] = os.getloadavg()
    result["notes"] = notes(result) + variant_notes
    return result


def notes(result: dict) -> list[str]:
    short = [f"{r['model']} {r['context']}x{r['batch']}: {r['decode_steps']} steps" for r in result["rows"]
             if r["decode_steps"] < result["decode_tokens"]]
    return [
        "decode_ms_per_token: median over decode_steps greedy steps of the lean loop t2r.decode.iter_decode "
        "(one model forward + argmax per token), after `warmup` steps; the two models' steps alternate",
        "caches: each model's real batch-1 prefill where cache_fill says so; otherwise that model's longest real "
        "prefill extended (softmax keys/values tiled along the sequence, recurrent state kept, token count set); "
        "batch B repeats the batch-1 cache B times",
        "prefill_tokens_per_s: a batch-1 prefill of the context in forwards of prefill_chunk tokens carrying the "
        "cache, the same for both models (median of up to 3 runs when short); "
        "None where skipped (prefill_skipped says why)",
        "cache_bytes: keys/values or recurrent state after the timed steps; peak_rss_bytes: the process's peak RSS "
        "so far (monotone, both models' weights included); rss_bytes: current RSS",
        "*_cpu_*: process CPU time (all threads) of the same steps/prefills: less sensitive than wall time to other "
        "jobs taking the cores, more sensitive to threads spinning",
        "weight_floor_ms: one matrix-vector product (batch 1) with every weight matrix, each tensor once",
        "train_tokens_per_s: forward + backward of the whole model at batch 1 (converted: chunked form; "
        "original: its attention implementation)",
        *(["decode steps cut by decode_cap_s: " + "; ".join(short)] if short else []),
    ]
