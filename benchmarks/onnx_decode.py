"""Decode speed of the ONNX graphs (`t2r export --onnx DIR [--onnx-int8]`) under onnxruntime: the float32 and (if
exported) int8 step graphs, batch 1, after a prefill of `context` random tokens, one step of each in turn.

    OMP_NUM_THREADS=1 python benchmarks/onnx_decode.py runs/onnx --context 128 --steps 32 --threads 1

Prints ms/token (median) per graph set; `--out FILE` writes them as JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np

from t2r.onnx_runner import OnnxRNN


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directory")
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out")
    args = parser.parse_args()
    runners = {"onnx-float32": OnnxRNN(args.directory, threads=args.threads)}
    if "step_int8" in runners["onnx-float32"].config["files"]:
        runners["onnx-int8"] = OnnxRNN(args.directory, int8=True, threads=args.threads)
    rng = np.random.default_rng(0)
    vocab = runners["onnx-float32"].config["vocab_size"]
    prompt = rng.integers(0, vocab, args.context).tolist()
    states, prefill_s = {}, {}
    for name, runner in runners.items():
        start = time.perf_counter()
        states[name] = runner.prefill(prompt)[1]
        prefill_s[name] = time.perf_counter() - start
    times = {name: [] for name in runners}
    for i in range(args.steps + 4):
        token = np.array([[int(rng.integers(0, vocab))]], dtype=np.int64)
        for name, runner in runners.items():
            start = time.perf_counter()
            _, states[name] = runner.run("step", token, args.context + i, states[name])
            if i >= 4:
                times[name].append(time.perf_counter() - start)
    result = {"context": args.context, "threads": args.threads, "prefill_seconds": prefill_s,
              "ms_per_token": {n: statistics.median(t) * 1e3 for n, t in times.items()}}
    for name, ms in result["ms_per_token"].items():
        print(f"{name:<13} {ms:7.1f} ms/token  (prefill of {args.context}: {prefill_s[name]:.1f} s)")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
