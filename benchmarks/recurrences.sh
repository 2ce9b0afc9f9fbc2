#!/usr/bin/env bash
# Issue 12: the recurrences that forget and overwrite (gla, delta, gated_delta), trained with their shipped recipes at a
# reduced budget (what one session's time allowed: 30k tokens of attention transfer and 10k of LoRA + KD, at the
# recipes' 2,048-token blocks), then measured like every other recipe (benchmarks/memory.py: loss by position over
# 16,384-token held-out documents, ablations, passkey, MQAR). One thread per process on the 2-core VM.
#   benchmarks/recurrences.sh train      # the pipelines, one after another
#   benchmarks/recurrences.sh measure    # the measurements (waits for each model)
set -euo pipefail
export HF_HUB_OFFLINE=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
RECIPES=(gla-transfer delta-transfer gated-delta-window)
BUDGET=(--eval.max_blocks 4 --eval.data '[austen]' --distill.tokens 30k --finetune.tokens 10k)
train() {
  for recipe in "${RECIPES[@]}"; do
    t2r pipeline --config $recipe --out runs/r-$recipe "${BUDGET[@]}"
  done
}
measure() {
  for recipe in "${RECIPES[@]}"; do
    until [ -f runs/r-$recipe/pipeline.json ] && [ -f runs/r-$recipe/finetune/config.json ]; do sleep 30; done
    python benchmarks/memory.py --model $recipe=runs/r-$recipe/finetune --skip-original --data austen,pydocs \
      --ablate-data austen --length 16384 --docs 1 --chunk 2048 --passkey-lengths 1k,2k,4k --depths 0,0.5,1 \
      --samples 4 --mqar-pairs 8,32 --out runs/memory/$recipe
  done
  python benchmarks/memory_report.py runs/memory --out docs/memory
}
"$@"
