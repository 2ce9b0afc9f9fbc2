"""What the pretrained weights are worth (the T2R paper's random-initialisation baseline, issue 3).

Reads the held-out curves (`metrics.jsonl`, "eval" rows) of two finetuning runs of the same RNN on the same data and
budget, one from the pretrained weights and one from random weights, and reports:
  - the perplexity of each after the same number of tokens,
  - for a few perplexity levels (each run's final, the pretrained run's untrained start, a ladder between), the
    tokens each run needed to first reach it ("not reached" within the budget),
and draws both curves (held-out perplexity against training tokens, log scale).

    python benchmarks/pretrained_vs_random.py runs/b200k-t2r-paper/finetune runs/b200k-random-init-baseline/finetune \
        --json docs/pretrained_vs_random.json --plot docs/pretrained_vs_random.png
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path


def curve(run_dir: str) -> list[tuple[int, float]]:
    """(tokens, held-out perplexity) at every evaluation of the run, in order."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise SystemExit(f"{path} does not exist: give the directory of a finished `t2r finetune` run")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    points = sorted({(r["tokens"], r["ppl"]) for r in rows if r.get("kind") == "eval"})
    if not points:
        raise SystemExit(f"{path} has no evaluations: run with --eval-every > 0")
    return points


def tokens_to_reach(points: list[tuple[int, float]], level: float) -> int | None:
    """Training tokens at the first evaluation at or below `level` (None: not within the run)."""
    return next((tokens for tokens, ppl in points if ppl <= level), None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pretrained", help="run directory of the finetuning from pretrained weights")
    parser.add_argument("random", help="run directory of the same finetuning from random weights")
    parser.add_argument("--json", help="write the figures here")
    parser.add_argument("--plot", help="write the curves here (PNG)")
    args = parser.parse_args()

    runs = {"pretrained": curve(args.pretrained), "random": curve(args.random)}
    final = {name: points[-1] for name, points in runs.items()}
    # levels: each run's final perplexity, the pretrained run's start (right after the swap, no training) and a
    # geometric ladder between the two finals and random's start
    lo, hi = final["pretrained"][1], max(final["random"][1], runs["random"][0][1])
    ladder = [math.exp(math.log(lo) + f * (math.log(hi) - math.log(lo))) for f in (0.25, 0.5, 0.75)]
    levels = sorted({final["random"][1], lo, runs["pretrained"][0][1], *ladder}, reverse=True)
    reach = [{"ppl": round(level, 2), **{name: tokens_to_reach(points, level) for name, points in runs.items()}}
             for level in levels]
    result = {"curves": {name: [{"tokens": t, "ppl": round(p, 2)} for t, p in points] for name, points in runs.items()},
              "final": {name: {"tokens": t, "ppl": round(p, 2)} for name, (t, p) in final.items()},
              "tokens_to_reach": reach}

    for name, (tokens, ppl) in final.items():
        print(f"from {name} weights: held-out perplexity {ppl:.2f} after {tokens:,} tokens")
    shared = min(final["pretrained"][0], final["random"][0])
    at = {name: next((p for t, p in reversed(points) if t <= shared), None) for name, points in runs.items()}
    result["at_equal_tokens"] = {"tokens": shared, **{k: v and round(v, 2) for k, v in at.items()}}
    print(f"at {shared:,} tokens: pretrained {at['pretrained']:.2f}, random {at['random']:.2f}")
    print("| held-out perplexity | tokens from pretrained | tokens from random |")
    print("|---:|---:|---:|")
    for row in reach:
        cells = [f"{row[name]:,}" if row[name] is not None else "not reached" for name in runs]
        print(f"| {row['ppl']} | {cells[0]} | {cells[1]} |")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        for name, points in runs.items():
            ax.plot([t / 1000 for t, _ in points], [p for _, p in points], marker="o", label=f"from {name} weights")
        ax.set_yscale("log")
        ax.set_xlabel("training tokens (thousands)")
        ax.set_ylabel("held-out perplexity (log)")
        ax.set_title("T2R finetuning: pretrained vs random initialisation")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)


if __name__ == "__main__":
    main()
