"""The paper's accuracy/efficiency trade-off: feature size of the `t2r` and `hedgehog` maps against held-out
perplexity (after a short attention transfer) and decode ms/token, on the embedded SmolLM2-135M.

    python benchmarks/feature_sweep.py --tokens 20k --dims 16,32,64,128 --out docs/feature_sweep

writes OUT.json and OUT.png and prints a table. Every run starts from the same dequantized weights.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import statistics
import tempfile
import time

import torch

import t2r
from t2r.data import prepare_data
from t2r.evaluate import perplexity
from t2r.sources import load_model
from t2r.stages.distill import attention_transfer
from t2r.train import TrainConfig, parse_tokens


def decode_ms(model, prompt_ids: torch.Tensor, steps: int = 24) -> tuple[float, int]:
    """(median ms of one decode step after a prefill of `prompt_ids`, cache bytes at the end)."""
    cache = t2r.new_cache(model)
    with torch.inference_mode():
        model(input_ids=prompt_ids, cache=cache, use_cache=True)
        token = prompt_ids[:, -1:]
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            token = model(input_ids=token, cache=cache, use_cache=True, logits_to_keep=1).logits.argmax(-1)
            times.append(1000 * (time.perf_counter() - start))
    return statistics.median(times[4:]), t2r.cache_bytes(cache)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--maps", default="t2r,hedgehog")
    parser.add_argument("--dims", default="16,32,64,128")
    parser.add_argument("--tokens", default="20k", help="attention-transfer tokens per run")
    parser.add_argument("--data", default="mix")
    parser.add_argument("--eval-blocks", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="docs/feature_sweep")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="sweep: %(message)s")
    torch.set_num_threads(args.threads)

    teacher, tokenizer, _ = load_model(None)
    blocks = prepare_data(args.data, tokenizer, block_size=512)
    heldout = prepare_data("austen", tokenizer, block_size=512).heldout[:args.eval_blocks]
    prompt = heldout[:1, :128]
    ms, nbytes = decode_ms(teacher, prompt)
    rows = [{"map": "original", "feature_dim": None, "ppl": perplexity(teacher, heldout)["ppl"], "decode_ms": ms,
             "cache_bytes": nbytes}]
    for name in args.maps.split(","):
        for dim in (int(d) for d in args.dims.split(",")):
            student = t2r.convert(copy.deepcopy(teacher), feature_map=name, feature_dim=dim)
            with tempfile.TemporaryDirectory() as out:
                config = TrainConfig(lr=3e-2, tokens=parse_tokens(args.tokens), eval_every=0, checkpoint_every=0,
                                     progress=False)
                attention_transfer(student, blocks, f"{out}/run", config, tokenizer=tokenizer)
            ms, nbytes = decode_ms(student, prompt)
            row = {"map": name, "feature_dim": dim, "ppl": perplexity(student, heldout)["ppl"], "decode_ms": ms,
                   "cache_bytes": nbytes}
            logging.info("%s", row)
            rows.append(row)
            del student
    result = {"tokens": args.tokens, "data": args.data, "eval": f"austen held-out, {args.eval_blocks} blocks of 512",
              "threads": args.threads, "rows": rows}
    with open(f"{args.out}.json", "w") as fh:
        json.dump(result, fh, indent=2)
    print(f"{'map':10} {'dim':>5} {'ppl':>9} {'ms/token':>9}")
    for r in rows:
        print(f"{r['map']:10} {str(r['feature_dim'] or '-'):>5} {r['ppl']:9.2f} {r['decode_ms']:9.1f}")
    plot(rows, f"{args.out}.png")


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name in sorted({r["map"] for r in rows} - {"original"}):
        pts = [r for r in rows if r["map"] == name]
        ax.plot([r["decode_ms"] for r in pts], [r["ppl"] for r in pts], "o-", label=name)
        for r in pts:
            ax.annotate(str(r["feature_dim"]), (r["decode_ms"], r["ppl"]), fontsize=8)
    orig = next(r for r in rows if r["map"] == "original")
    ax.axhline(orig["ppl"], color="gray", ls=":", label="original")
    ax.set_xlabel("decode ms/token")
    ax.set_ylabel("held-out perplexity (log)")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
