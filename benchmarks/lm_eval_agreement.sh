#!/usr/bin/env bash
# lm-evaluation-harness vs `t2r eval --text` on the same text: word perplexity (and byte perplexity, bits per byte)
# of a converted model and of its original softmax model, each computed by both; prints a table, writes JSON.
#
#   benchmarks/lm_eval_agreement.sh [MODEL_DIR] [OUT_DIR]      # defaults: runs/smol-rnn runs/lm_eval_agreement (git-ignored)
#   env: CONTEXT=512 (lm-eval max_length = t2r --context)  BLOCKS=16 (held-out Austen blocks of 512 tokens)  DEVICE=cpu
#
# Both models go through lm-eval's own command line as ordinary HF directories (`--model hf`): the converted one as
# saved by t2r, the original rebuilt from its weights (t2r.adapters.original_model) and saved to OUT_DIR/original
# (deleted at the end). Needs `pip install 't2r[lm-eval]'`.
set -euo pipefail
MODEL=${1:-runs/smol-rnn}
OUT=${2:-runs/lm_eval_agreement}
CONTEXT=${CONTEXT:-512}
BLOCKS=${BLOCKS:-16}
DEVICE=${DEVICE:-cpu}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$OUT"
trap 'rm -rf "$OUT/original"' EXIT
START=$(date +%s)

echo "== 1. the text (held-out Austen, decoded) and the original model as a plain HF directory" >&2
python - "$MODEL" "$OUT" "$BLOCKS" <<'PY'
import shutil, sys
import t2r
from t2r.adapters import original_model
from t2r.lm_eval_bridge import austen_heldout_file
from t2r.persistence import load_tokenizer

model, out, blocks = sys.argv[1], sys.argv[2], int(sys.argv[3])
tokenizer = load_tokenizer(model)
shutil.copyfile(austen_heldout_file(tokenizer, blocks=blocks), f"{out}/text.jsonl")
original_model(t2r.load(model)).save_pretrained(f"{out}/original")
tokenizer.save_pretrained(f"{out}/original")
PY

for which in converted original; do
  dir=$MODEL; [ "$which" = original ] && dir=$OUT/original
  echo "== 2. lm-eval on the $which model ($dir)" >&2
  rm -rf "$OUT/lm_eval_$which"
  python -m t2r.lm_eval_bridge --model hf --model_args "pretrained=$dir,max_length=$CONTEXT,dtype=float32" \
    --device "$DEVICE" --batch_size 1 --tasks t2r_text --metadata "{\"text\": \"$OUT/text.jsonl\"}" \
    --output_path "$OUT/lm_eval_$which" >&2
done

echo "== 3. t2r eval --text (converted and original)" >&2
t2r eval "$MODEL" --text "$OUT/text.jsonl" --context "$CONTEXT" --batch-size 1 --json > "$OUT/t2r_eval.json"

echo "== 4. compare" >&2
python - "$OUT" "$MODEL" "$CONTEXT" "$(( $(date +%s) - START ))" <<'PY'
import glob, json, platform, sys
import lm_eval, torch

out, model, context, seconds = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
ours = json.load(open(f"{out}/t2r_eval.json"))
rows = []
for which, row in (("converted", "student"), ("original", "teacher")):
    [path] = glob.glob(f"{out}/lm_eval_{which}/**/results_*.json", recursive=True)
    theirs = json.load(open(path))["results"]["t2r_text"]
    for metric in ("word_perplexity", "byte_perplexity", "bits_per_byte"):
        a, b = theirs[f"{metric},none"], ours[row][metric]
        rows.append({"model": which, "metric": metric, "lm_eval": a, "t2r_eval": b, "rel_diff": abs(a - b) / abs(b)})
report = {"model": model, "text": ours["text"], "documents": ours["documents"], "tokens": ours["student"]["tokens"],
          "words": ours["student"]["words"], "context": context, "lm_eval_version": lm_eval.__version__,
          "torch": torch.__version__, "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
          "seconds": seconds, "rows": rows, "max_rel_diff": max(r["rel_diff"] for r in rows)}
json.dump(report, open(f"{out}/agreement.json", "w"), indent=2)
print(f"{model}: {report['documents']} documents, {report['tokens']} tokens, {report['words']} words, "
      f"max_length {context}, lm-eval {report['lm_eval_version']}")
print(f"{'model':10} {'metric':16} {'lm-eval':>14} {'t2r eval':>14} {'rel. diff':>10}")
for r in rows:
    print(f"{r['model']:10} {r['metric']:16} {r['lm_eval']:14.6f} {r['t2r_eval']:14.6f} {r['rel_diff']:10.2e}")
print(f"max relative difference {report['max_rel_diff']:.2e} ({'within' if report['max_rel_diff'] < 0.01 else 'NOT within'} 1%)")
PY
