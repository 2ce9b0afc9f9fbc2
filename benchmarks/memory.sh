#!/usr/bin/env bash
# Issue 11: does the RNN remember? Every shipped recipe at a reduced budget (stage budgets below, a fraction of the
# shipped ones: what one session's time allowed), then benchmarks/memory.py on each: loss by position over one whole
# 16,384-token held-out document per corpus (ablations on Austen), passkey and MQAR (4 samples per cell). Two
# processes of one thread each on the 2-core VM: the pipelines one after another, the measurements as each model is
# ready.
#   benchmarks/memory.sh train      # the pipelines
#   benchmarks/memory.sh measure    # the measurements (waits for each model)
set -euo pipefail
export HF_HUB_OFFLINE=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
SMALL=(--eval.max_blocks 4 --eval.data '[austen]')
train() {
  t2r convert --feature-map hedgehog --feature-dim 64 --window 64 --out runs/m-swap --overwrite
  t2r pipeline --config demo --out runs/m-demo "${SMALL[@]}"
  for recipe in hybrid-window-auto hedgehog-transfer t2r-transfer; do
    t2r pipeline --config $recipe --out runs/m-$recipe "${SMALL[@]}" --distill.tokens 30k --finetune.tokens 10k
  done
  t2r pipeline --config t2r-paper --out runs/m-t2r-paper "${SMALL[@]}" --finetune.tokens 15k --finetune.eval_every 0
  t2r pipeline --config random-init-baseline --out runs/m-random-init "${SMALL[@]}" --finetune.tokens 15k \
    --finetune.eval_every 0
}
wait_for() { until [ -f "$1/config.json" ] && [ -f "$(dirname "$1")/pipeline.json" -o "$1" = runs/m-swap ]; do sleep 30; done; }
measure() {  # windows or softmax layers: three corpora; the pure recurrent ones: Austen. Passkey: the two best.
  local all=(--data austen,kjv,pydocs --ablate-data austen) one=(--data austen --tasks mqar)
  run swap=runs/m-swap "${all[@]}" --tasks mqar  # measures the original too (first)
  run demo=runs/m-demo/distill "${all[@]}" --skip-original
  run hybrid-window-auto=runs/m-hybrid-window-auto/finetune "${all[@]}" --skip-original
  for recipe in hedgehog-transfer t2r-transfer t2r-paper random-init; do
    run $recipe=runs/m-$recipe/finetune "${one[@]}" --skip-original
  done
  python benchmarks/memory_report.py runs/memory --out docs/memory
}
run() {
  local spec=$1; shift
  wait_for "${spec#*=}"
  python benchmarks/memory.py --model "$spec" "$@" --length 16384 --docs 1 --chunk 2048 --passkey-lengths 1k,2k,4k \
    --depths 0,0.5,1 --samples 4 --mqar-pairs 8,32 --out "runs/memory/${spec%%=*}"
}
"$@"
