"""Held-out perplexity of a model exactly as `t2r pipeline` evaluates it: the corpus cut in blocks of --block-size,
read in non-overlapping windows of --context, the first --max-blocks held-out blocks, batch 2 (results remembered on
disk like the pipeline's). For re-evaluating a stage of a finished pipeline, e.g. after a change of t2r's math:

    python benchmarks/pipeline_eval.py runs/gdw-320k/distill --data austen,pydocs --block-size 2048 --json out.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from t2r.data import prepare_data
from t2r.evaluate import cached_perplexity
from t2r.sources import load_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", help="a model directory (a pipeline stage), GGUF file or built-in name")
    ap.add_argument("--data", default="austen,pydocs", help="held-out corpora, comma-separated")
    ap.add_argument("--block-size", type=int, default=2048, help="the recipe's block_size")
    ap.add_argument("--context", type=int, default=512, help="the recipe's eval.context")
    ap.add_argument("--max-blocks", type=int, default=24, help="the recipe's eval.max_blocks")
    ap.add_argument("--json", type=Path, help="also write the result here")
    args = ap.parse_args()
    model, tokenizer, _ = load_model(args.model)
    ppl = {}
    for source in args.data.split(","):
        heldout = prepare_data(source, tokenizer, block_size=args.block_size).heldout
        ppl[source] = round(cached_perplexity(model, heldout, context=args.context, max_blocks=args.max_blocks,
                                              batch_size=2)["ppl"], 3)
        print(f"{source}: {ppl[source]}", flush=True)
    result = {"model": args.model, "ppl": ppl, "block_size": args.block_size, "context": args.context,
              "max_blocks": args.max_blocks}
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
