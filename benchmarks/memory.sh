#!/usr/bin/env bash
# Issue 11: does the RNN remember? Every shipped recipe at a reduced budget (stage budgets below; the 200k-token
# figures of docs/RESULTS.md used the full ones), then benchmarks/memory.py on each: loss by position over one whole
# 16,384-token held-out document of each corpus (plus ablations), passkey and MQAR. Two processes of one thread each
# on the 2-core VM: the pipelines one after another, the measurements as each model is ready.
#   benchmarks/memory.sh train      # the pipelines
#   benchmarks/memory.sh measure    # the measurements (waits for each model)
set -euo pipefail
export HF_HUB_OFFLINE=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
SMALL=(--eval.max_blocks 4 --eval.data '[austen]')
train() {
  t2r convert --feature-map hedgehog --feature-dim 64 --window 64 --out runs/m-swap --overwrite
  t2r pipeline --config demo --out runs/m-demo "${SMALL[@]}"
  t2r pipeline --config hybrid-window-auto --out runs/m-hybrid-window-auto "${SMALL[@]}" \
    --distill.tokens 60k --finetune.tokens 20k
  t2r pipeline --config hedgehog-transfer --out runs/m-hedgehog-transfer "${SMALL[@]}" \
    --distill.tokens 60k --finetune.tokens 20k
  t2r pipeline --config t2r-transfer --out runs/m-t2r-transfer "${SMALL[@]}" --distill.tokens 60k --finetune.tokens 20k
  t2r pipeline --config t2r-paper --out runs/m-t2r-paper "${SMALL[@]}" --finetune.tokens 30k --finetune.eval_every 0
  t2r pipeline --config random-init-baseline --out runs/m-random-init "${SMALL[@]}" --finetune.tokens 30k \
    --finetune.eval_every 0
}
wait_for() { until [ -f "$1/config.json" ] && [ -f "$(dirname "$1")/pipeline.json" -o "$1" = runs/m-swap ]; do sleep 30; done; }
measure() {
  local models=(swap=runs/m-swap demo=runs/m-demo/distill hybrid-window-auto=runs/m-hybrid-window-auto/finetune
                hedgehog-transfer=runs/m-hedgehog-transfer/finetune t2r-transfer=runs/m-t2r-transfer/finetune
                t2r-paper=runs/m-t2r-paper/finetune random-init=runs/m-random-init/finetune)
  for spec in "${models[@]}"; do
    name=${spec%%=*}; dir=${spec#*=}
    wait_for "$dir"
    first=(); [ "$name" = swap ] || first=(--skip-original)
    python benchmarks/memory.py --model "$spec" "${first[@]}" --data austen,kjv,pydocs --length 16384 --docs 1 \
      --passkey-lengths 1k,2k,4k --depths 0,0.5,1 --samples 4 --mqar-pairs 8,32 --out "runs/memory/$name"
  done
  python benchmarks/memory_report.py runs/memory --out docs/memory
}
"$@"
