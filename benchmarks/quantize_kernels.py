"""Which int8 linear is fastest for a batch-1 decode step on this CPU: float32 `F.linear` against PyTorch's
dynamically quantized linear (what `t2r.quantize` uses), torchao's int8 weight-only and int8 dynamic configs (if
torchao is installed) and `torch._weight_int8pack_mm`, at SmolLM2-135M's shapes.

    OMP_NUM_THREADS=1 python benchmarks/quantize_kernels.py --threads 1

Prints microseconds per call (median of repeats of 200 calls) and each kernel's time / float32. The same weight is
read on every call, so the LM head (113 MB float32, 28 MB int8) is timed partly from cache: see the whole-model
figures of `t2r bench --quantize int8` for decode as it runs.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
import warnings

import torch

SHAPES = {"mlp up (576 -> 1536)": (576, 1536), "mlp down (1536 -> 576)": (1536, 576), "lm head (576 -> 49152)":
          (576, 49152)}


def timed_us(fn, x, calls: int = 200, repeats: int = 5) -> float:
    for _ in range(10):
        fn(x)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn(x)
        times.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(times)


def kernels(linear: torch.nn.Linear) -> dict:
    out = {"float32": linear}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out["torch quantize_dynamic (t2r)"] = torch.ao.quantization.quantize_dynamic(
            torch.nn.Sequential(copy.deepcopy(linear)), {torch.nn.Linear: torch.ao.quantization.per_channel_dynamic_qconfig},
            dtype=torch.qint8)
    try:
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig, quantize_
    except ImportError:
        pass
    else:
        for name, config in (("torchao int8 weight-only", Int8WeightOnlyConfig()),
                             ("torchao int8 dynamic", Int8DynamicActivationInt8WeightConfig())):
            module = torch.nn.Sequential(copy.deepcopy(linear))
            quantize_(module, config)
            out[name] = module
    w = linear.weight.detach()
    scale = w.abs().amax(1) / 127  # (out,)
    packed = torch.round(w / scale[:, None]).to(torch.int8)  # (out, in)
    out["torch _weight_int8pack_mm"] = lambda x: torch._weight_int8pack_mm(x.view(-1, w.shape[1]), packed, scale)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    with torch.inference_mode():
        for label, (fan_in, fan_out) in SHAPES.items():
            linear = torch.nn.Linear(fan_in, fan_out, bias=False)
            x = torch.randn(1, 1, fan_in)
            times = {name: timed_us(fn, x) for name, fn in kernels(linear).items()}
            print(label)
            for name, us in times.items():
                print(f"  {name:<30} {us:>9.1f} us  {us / times['float32']:>6.2f}x float32")


if __name__ == "__main__":
    main()
