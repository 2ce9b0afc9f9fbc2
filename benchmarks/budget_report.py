"""Collect the issue-3 budget runs (benchmarks/budget.sh) into markdown tables and one JSON file.

    python benchmarks/budget_report.py runs --json docs/budget_runs.json

Reads RUNS/b200k-<recipe>/pipeline.json and RUNS/hybrid-650k/pipeline.json (the target attempt, 650k tokens),
each stage's train.json for wall time and tokens, and the reference RUNS/b200k-teacher-ft/eval-<set>.json; prints one
table per run (perplexity after every stage) and a summary (final perplexity against the original and against the
finetuned original). Missing runs are listed, not guessed. The reference saw 120k distinct tokens, hybrid-650k 500k:
its ratio to the reference is a lower bound on its ratio to the original finetuned on its own 500k tokens.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

RECIPES = ["t2r-paper", "random-init-baseline", "t2r-transfer", "hedgehog-transfer", "hybrid-window-auto"]
RUN_DIRS = {**{recipe: f"b200k-{recipe}" for recipe in RECIPES}, "hybrid-650k": "hybrid-650k"}
SETS = ["austen", "pydocs"]


def stage_cost(run: Path) -> tuple[int, float]:
    """(training tokens, training seconds) summed over the run's stages."""
    tokens = seconds = 0
    for stage in ("distill", "finetune"):
        path = run / stage / "train.json"
        if path.is_file():
            info = json.loads(path.read_text())
            tokens += int(info["tokens"])
            seconds += float(info["seconds"])
    return tokens, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", help="folder holding the b200k-* run directories")
    parser.add_argument("--json", help="write everything collected here")
    args = parser.parse_args()
    root = Path(args.runs)

    reference = {}
    for name in SETS:
        path = root / "b200k-teacher-ft" / f"eval-{name}.json"
        try:
            reference[name] = json.loads(path.read_text())["teacher"]["ppl"]
        except (OSError, ValueError, KeyError):
            print(f"(no reference for {name}: {path} missing or unfinished)")
    collected = {"reference_finetuned_original": reference, "recipes": {}}
    missing = []
    for recipe, run_dir in RUN_DIRS.items():
        path = root / run_dir / "pipeline.json"
        if not path.is_file():
            missing.append(recipe)
            continue
        result = json.loads(path.read_text())
        tokens, seconds = stage_cost(root / run_dir)
        collected["recipes"][recipe] = {"stages": result["stages"], "train_tokens": tokens,
                                        "train_seconds": round(seconds, 1), "generation": result["generation"],
                                        "layer_errors": result.get("layer_errors")}
        print(f"\n**{recipe}** ({tokens:,} training tokens, {seconds / 60:.1f} min of training)\n")
        print("| stage | " + " | ".join(SETS) + " |")
        print("|---|" + "---:|" * len(SETS))
        for row in result["stages"]:
            print(f"| {row['stage']} | " + " | ".join(f"{row['ppl'][s]:.2f}" for s in SETS) + " |")

    print("\n| recipe | train tokens | Austen | x finetuned original | Python docs | x original | x finetuned original "
          "| decode state |")
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    for recipe, r in collected["recipes"].items():
        final, original = r["stages"][-1]["ppl"], r["stages"][0]["ppl"]
        vs_ref = f"{final['austen'] / reference['austen']:.3f}" if "austen" in reference else "-"
        vs_ref_py = f"{final['pydocs'] / reference['pydocs']:.3f}" if "pydocs" in reference else "-"
        cache = r["generation"]["student"]["cache_bytes"] / 2**20
        print(f"| {recipe} | {r['train_tokens']:,} | {final['austen']:.2f} | {vs_ref} | {final['pydocs']:.2f} | "
              f"{final['pydocs'] / original['pydocs']:.3f} | {vs_ref_py} | {cache:.1f} MiB after "
              f"{r['generation']['student']['context']} tokens |")
    if reference:
        print("\nreference, the original finetuned (LoRA 8) on the 120k distinct tokens of the 200k recipes (hybrid-650k "
              "saw 500k: its ratio to the reference is a lower bound): "
              + ", ".join(f"{k} {v:.2f}" for k, v in reference.items()))
    if missing:
        print(f"\nnot run (no pipeline.json): {', '.join(missing)}")
    if args.json:
        Path(args.json).write_text(json.dumps(collected, indent=2) + "\n")


if __name__ == "__main__":
    main()
