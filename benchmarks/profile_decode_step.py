"""Where one decode step's time goes, for a converted model and its original at a given context (CPU).

    python benchmarks/profile_decode_step.py runs/smol-rnn --context 16384 --threads 1

Prints, per model: wall ms/step, the aten ops' self time by kind (torch.profiler), the rest (Python and dispatch),
and the time inside each kind of module (forward hooks). Caches are filled as in `t2r bench` (a real 256-token
prefill extended to the context), so nothing here is quadratic.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

import t2r
from t2r.adapters import extend_kv_cache as extend_cache
from t2r.adapters import original_model
from t2r.bench.measure import own_weights, prefill

KINDS = {"aten::mm": "matmul with weights", "aten::addmm": "matmul with weights", "aten::bmm": "bmm/einsum",
         "aten::addcmul": "state update (addcmul)", "aten::cat": "cat (KV cache append)",
         "aten::_scaled_dot_product_flash_attention_for_cpu": "sdpa"}


def module_times(model, step, n: int) -> dict:
    """Inclusive wall time per module class over n steps (outermost call of each class only)."""
    totals, starts, depth = defaultdict(float), {}, defaultdict(int)

    def pre(mod, args):
        name = type(mod).__name__
        depth[name] += 1
        if depth[name] == 1:
            starts[name] = time.perf_counter()

    def post(mod, args, out):
        name = type(mod).__name__
        depth[name] -= 1
        if depth[name] == 0:
            totals[name] += time.perf_counter() - starts[name]

    handles = [m.register_forward_pre_hook(pre) for m in model.modules()]
    handles += [m.register_forward_hook(post) for m in model.modules()]
    for _ in range(n):
        step()
    for h in handles:
        h.remove()
    return {k: v / n * 1e3 for k, v in sorted(totals.items(), key=lambda kv: -kv[1])}


def profile_model(name: str, model, context: int, steps: int) -> None:
    ids = torch.randint(0, model.config.vocab_size, (1, 256), generator=torch.Generator().manual_seed(0))
    cache = extend_cache(prefill(model, ids, torch.device("cpu"))[2], context)
    token, pos = torch.tensor([[5]]), [context]

    def step():
        model(input_ids=token, position_ids=torch.tensor([pos]), cache=cache, use_cache=True, logits_to_keep=1)
        pos[0] += 1

    with torch.inference_mode():
        for _ in range(3):
            step()
        walls = []
        for _ in range(steps):
            start = time.perf_counter()
            step()
            walls.append(time.perf_counter() - start)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            start = time.perf_counter()
            for _ in range(steps):
                step()
            profiled = (time.perf_counter() - start) / steps * 1e3
        modules = module_times(model, step, steps)
    wall = statistics.median(walls) * 1e3
    kinds = defaultdict(float)
    for event in prof.key_averages():
        kinds[KINDS.get(event.key, "other aten ops")] += event.self_cpu_time_total / steps / 1e3
    calls = sum(e.count for e in prof.key_averages()) / steps
    print(f"\n{name} at context {context}: {wall:.1f} ms/step wall (median of {steps}; {profiled:.1f} under the "
          f"profiler), {calls:.0f} aten calls/step")
    for kind, ms in sorted(kinds.items(), key=lambda kv: -kv[1]):
        print(f"  {kind:28} {ms:7.2f} ms")
    print(f"  {'Python + dispatch (rest)':28} {profiled - sum(kinds.values()):7.2f} ms (of the profiled step)")
    print("  inside modules (inclusive, with hook overhead): " + ", ".join(
        f"{k} {v:.1f}" for k, v in list(modules.items())[:8]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model")
    parser.add_argument("--context", type=int, default=16384)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--models", default="converted,original", help="which of converted,original to profile")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    converted = own_weights(t2r.load(args.model))
    for name in args.models.split(","):
        model = converted if name == "converted" else original_model(converted)
        profile_model(name, model, args.context, args.steps)


if __name__ == "__main__":
    main()
