"""What compiling the one-token step buys on this CPU: a converted model's decode step at a given context as the
model's forward with its cache (what `t2r.decode` runs), as `t2r.step.StateStep` in eager mode, and as StateStep
compiled by torch.compile (inductor) with and without inductor's `freezing` (weights folded in as constants, which
lets inductor pre-pack the linear layers for oneDNN); interleaved, one step of each in turn.

    OMP_NUM_THREADS=1 python benchmarks/compile_step.py runs/smol-rnn --context 128 --steps 32 --out runs/compile.json

Prints ms/step (median) per variant, its ratio to the eager model step, and the compile time of each variant.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import t2r
from t2r.bench.measure import own_weights, weight_floor_ms
from t2r.step import StateStep, flatten_states, state_layout


def clock() -> float:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
    return time.perf_counter()


WEIGHT_OPS = ("aten::mm", "aten::addmm", "aten::linear", "aten::matmul", "mkldnn", "mkl_linear", "aten::_mkl")


def profile_split(fn, steps: int = 8) -> dict:
    """ms per step: self CPU time of the weight matmuls, of every other op, and the wall time not in any op."""
    from torch.profiler import ProfilerActivity, profile

    with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            fn()
        wall = (time.perf_counter() - start) / steps * 1e3
    weights = other = 0.0
    for event in prof.key_averages():
        ms = event.self_cpu_time_total / 1e3 / steps
        if any(event.key.startswith(k) or k in event.key for k in WEIGHT_OPS):
            weights += ms
        else:
            other += ms
    return {"wall": wall, "weight matmuls": weights, "other ops": other,
            "outside ops": max(wall - weights - other, 0.0)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--variants", default="eager-model,eager-step,compiled,compiled-freezing")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--profile", action="store_true", help="then profile 8 steps of each variant (torch.profiler): "
                        "self time of the weight matmuls against everything else")
    parser.add_argument("--out")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model = own_weights(t2r.load(args.model).to(device).eval())
    ids = torch.randint(0, model.config.vocab_size, (1, args.context), generator=torch.Generator().manual_seed(0))
    ids = ids.to(device)
    with torch.inference_mode():
        cache = t2r.new_cache(model)
        model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1)
        layout, state = state_layout(cache), flatten_states(cache)
    token, pos = ids[:, -1:], torch.tensor([[args.context]], device=device)

    def model_step():
        c = t2r.new_cache(model)
        for layer, s in zip(c.layers, t2r.step.group_states(state, layout)):
            layer.state, layer.seen_tokens = s, args.context
        return model(input_ids=token, position_ids=pos, cache=c, use_cache=True, logits_to_keep=1).logits

    eager = StateStep(model, layout)
    fns, compile_s = {}, {}
    for name in args.variants.split(","):
        start = time.perf_counter()
        if name == "eager-model":
            fns[name] = model_step
        elif name == "eager-step":
            fns[name] = lambda: eager(token, pos, *state)
        else:
            torch._inductor.config.freezing = name.endswith("freezing")
            compiled = torch.compile(StateStep(model, layout), dynamic=False)
            with torch.inference_mode():
                compiled(token, pos, *state)
            fns[name] = (lambda c: lambda: c(token, pos, *state))(compiled)
        compile_s[name] = time.perf_counter() - start
        print(f"{name}: ready in {compile_s[name]:.0f} s", flush=True)
    times = {n: [] for n in fns}
    with torch.inference_mode():
        for i in range(args.steps + 4):
            for name, fn in fns.items():
                start = clock()
                fn()
                if i >= 4:
                    times[name].append(clock() - start)
        floor = weight_floor_ms(model, device)
    ms = {n: statistics.median(t) * 1e3 for n, t in times.items()}
    base = ms.get("eager-model") or next(iter(ms.values()))
    print(f"context {args.context}, {args.threads} thread(s); weight-reading floor {floor:.1f} ms")
    for name, value in ms.items():
        print(f"  {name:<18} {value:7.1f} ms/step  {value / base:5.2f}x eager model  {value / floor:5.2f}x floor")
    if args.profile:
        result_profile = {name: profile_split(fn) for name, fn in fns.items()}
        for name, split in result_profile.items():
            print(f"  profile {name:<18} " + ", ".join(f"{k} {v:.1f} ms" for k, v in split.items()))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"context": args.context, "threads": args.threads, "ms_per_step": ms, "floor_ms": floor,
                       "compile_seconds": compile_s, "load_average": list(__import__("os").getloadavg()),
                       "profile_ms_per_step": result_profile if args.profile else None}, f,
                      indent=2)


if __name__ == "__main__":
    main()
