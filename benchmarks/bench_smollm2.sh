#!/usr/bin/env bash
# The run behind docs/RESULTS.md "Speed and memory (issue 4)": SmolLM2-135M-Instruct converted (hedgehog, every
# layer linear) against its original, on this machine's CPU, float32.
#
#   benchmarks/bench_smollm2.sh                 # writes docs/bench_smollm2.{json,png} and prints the table
#   THREADS=2 OUT=/tmp/b benchmarks/bench_smollm2.sh
#
# THREADS defaults to 1: the 2-core machine is shared with other jobs, and with 2 torch threads every small op waits
# for the thread that the other job pre-empted (decode steps then vary by 10x); 1 thread gives stable medians.
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${MODEL:-runs/smol-rnn}
THREADS=${THREADS:-1}
OUT=${OUT:-docs}
DEVICE=${DEVICE:-cpu}
if [ ! -d "$MODEL" ]; then
    t2r convert --out "$MODEL"  # the embedded SmolLM2-135M-Instruct, hedgehog feature maps (~20 s)
fi
mkdir -p "$OUT"
ARGS=(--contexts 128,1k,4k,16k --batch 1,8 --decode-tokens 32 --warmup 4 --threads "$THREADS" --device "$DEVICE"
      --prefill-cap-s 150 --decode-cap-s 150 --prefill-chunk 2048 --train-seq 2048 --train-steps 2
      --plot "$OUT/bench_smollm2.png" --out-json "$OUT/bench_smollm2.json")
t2r bench "$MODEL" "${ARGS[@]}"
python benchmarks/bench_targets.py "$OUT/bench_smollm2.json"  # the project's targets (not shown by `t2r bench`)
