"""Many streams at once: decode tokens/s against the number of concurrent streams N at one context length, for a
converted model (fixed-size state per row, `t2r.batching`) and its original (HF's growing KV cache), and the memory
each holds; then `t2r.batching.serve` itself on requests of mixed lengths joining and leaving.

    OMP_NUM_THREADS=1 python benchmarks/batching.py runs/smol-rnn --context 4096 --streams 1,4,16,64 \
        --original-streams 1,4 --out runs/batching.json

Steady state: each model's batch-1 cache after a real prefill of `context` random tokens is repeated N times; the
median time of `steps` batched greedy steps gives tokens/s = N / step time. Memory: state or KV cache bytes at N
(the KV cache after the steps). The budget line: the original's KV cache at `--budget-streams` streams; how many
converted streams fit in it. Serve: `--requests` prompts of 16..128 tokens, 8..24 new tokens each, at each
`--serve-batch` (max_batch), wall tokens/s including every prefill.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

import t2r
from t2r.adapters import cache_bytes, original_model
from t2r.batching import default_step, serve
from t2r.bench.measure import copy_cache, own_weights, prefill
from t2r.bench.settings import parse_sizes
from t2r.decode import iter_decode
from t2r.step import flatten_states, state_layout


def clock() -> float:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
    return time.perf_counter()


def converted_rate(model, cache, n: int, steps: int) -> dict:
    layout = state_layout(cache)
    state = [t.repeat_interleave(n, 0) for t in flatten_states(cache)]
    step = default_step(model, layout)
    device = state[0].device
    ids = torch.zeros(n, 1, dtype=torch.long, device=device)
    pos = torch.full((n, 1), cache.get_seq_length(), device=device)
    times = []
    with torch.inference_mode():
        for i in range(steps + 2):
            start = clock()
            logits, *state = step(ids, pos, *state)
            times.append(clock() - start)
            ids, pos = logits.argmax(-1)[:, None], pos + 1
    ms = statistics.median(times[2:]) * 1e3
    return {"streams": n, "ms_per_step": ms, "tokens_per_s": n * 1e3 / ms,
            "memory_bytes": sum(t.numel() * t.element_size() for t in state)}


def original_rate(model, cache, n: int, steps: int) -> dict:
    rows = copy_cache(cache, n)
    device = next(model.parameters()).device
    loop = iter_decode(model, torch.zeros(n, 1, dtype=torch.long, device=device), cache=rows,
                       max_new_tokens=steps + 3)
    times = []
    for _ in range(steps + 2):
        start = clock()
        next(loop)
        times.append(clock() - start)
    loop.close()
    ms = statistics.median(times[2:]) * 1e3
    return {"streams": n, "ms_per_step": ms, "tokens_per_s": n * 1e3 / ms, "memory_bytes": cache_bytes(rows)}


def serve_rate(model, requests: int, max_batch: int, vocab: int) -> dict:
    g, device = torch.Generator().manual_seed(0), next(model.parameters()).device
    prompts = [torch.randint(0, vocab, (int(n),), generator=g).to(device)
               for n in torch.randint(16, 129, (requests,), generator=g)]
    budgets = torch.randint(8, 25, (requests,), generator=g).tolist()
    sizes = []
    start = time.perf_counter()
    out = serve(model, prompts, max_new_tokens=budgets, max_batch=max_batch, on_step=sizes.append)
    seconds = time.perf_counter() - start
    made = sum(len(o) for o in out)
    return {"max_batch": max_batch, "requests": requests, "new_tokens": made, "seconds": seconds,
            "tokens_per_s": made / seconds, "mean_batch": statistics.mean(sizes) if sizes else 0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--context", type=int, default=4096)
    parser.add_argument("--streams", default="1,4,16,64")
    parser.add_argument("--original-streams", default="1,4")
    parser.add_argument("--budget-streams", type=int, default=4)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--serve-batch", default="1,16")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    converted = own_weights(t2r.load(args.model).to(device).eval())
    original = original_model(converted).eval()
    vocab = converted.config.vocab_size
    ids = torch.randint(0, vocab, (1, args.context), generator=torch.Generator().manual_seed(1)).to(device)
    result = {"context": args.context, "threads": args.threads, "device": str(device),
              "load_average_start": os.getloadavg()}
    caches = {}
    for name, model in (("converted", converted), ("original", original)):
        seconds, _, caches[name] = prefill(model, ids, device, chunk=2048, max_runs=1)
        print(f"{name}: prefill of {args.context} tokens {seconds:.1f} s", flush=True)
    rows = {"converted": [], "original": []}
    for n in parse_sizes(args.streams, "--streams"):
        rows["converted"].append(converted_rate(converted, caches["converted"], n, args.steps))
        print("converted", rows["converted"][-1], flush=True)
    for n in parse_sizes(args.original_streams, "--original-streams"):
        rows["original"].append(original_rate(original, caches["original"], n, args.steps))
        print("original", rows["original"][-1], flush=True)
    per_row = rows["converted"][0]["memory_bytes"] / rows["converted"][0]["streams"]
    budget = cache_bytes(caches["original"]) * args.budget_streams
    result.update(rows=rows, state_bytes_per_stream=per_row, budget_bytes=budget,
                  converted_streams_in_budget=int(budget // per_row))
    print(f"budget: the original's KV cache at {args.budget_streams} streams = {budget / 2**20:.0f} MiB holds "
          f"{int(budget // per_row)} converted streams ({per_row / 2**20:.1f} MiB each)", flush=True)
    result["serve"] = []
    for b in parse_sizes(args.serve_batch, "--serve-batch"):
        result["serve"].append(serve_rate(converted, args.requests, b, vocab))
        print("serve", result["serve"][-1], flush=True)
    result["load_average_end"] = os.getloadavg()
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
