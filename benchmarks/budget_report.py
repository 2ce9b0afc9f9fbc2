"""Collect the issue-3 budget runs (benchmarks/budget.sh) into markdown tables and one JSON file.

    python benchmarks/budget_report.py runs --json docs/budget_runs.json

Reads RUNS/b200k-<recipe>/pipeline.json and RUNS/hybrid-{650k,800k,800k-auto9}/pipeline.json (the target
attempts), each stage's train.json for wall time and tokens (hybrid-800k's include its finetuned teacher), and
the references, the original finetuned with LoRA 8 on the first 120k / 150k / 500k tokens of the same seeded order
(RUNS/<reference>/eval-<set>.json); prints one table per run (perplexity after every stage) and a summary: final
perplexity against the original and against the finetuned original that saw the same distinct tokens (120k for the
200k recipes, 500k for the hybrids; the 150k reference is reported beside it). Missing runs are listed, not guessed.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

RECIPES = ["t2r-paper", "random-init-baseline", "t2r-transfer", "hedgehog-transfer", "hybrid-window-auto"]
RUN_DIRS = {**{recipe: f"b200k-{recipe}" for recipe in RECIPES}, "hybrid-650k": "hybrid-650k",
            "hybrid-800k": "hybrid-800k", "hybrid-800k-auto9": "hybrid-800k-auto9"}
SETS = ["austen", "pydocs"]
REFERENCES = {"120k": "b200k-teacher-ft", "150k": "teacher-ft-150k", "500k": "teacher-ft-500k"}
MATCHED = {**{recipe: "120k" for recipe in RECIPES}, "hybrid-650k": "500k", "hybrid-800k": "500k",
           "hybrid-800k-auto9": "500k"}


def stage_cost(run: Path) -> tuple[int, float]:
    """(training tokens, training seconds) summed over the run's stages."""
    tokens = seconds = 0
    for stage in ("distill", "teacher-finetune", "finetune"):
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

    references = {}
    for size, run_dir in REFERENCES.items():
        for name in SETS:
            path = root / run_dir / f"eval-{name}.json"
            try:
                references.setdefault(size, {})[name] = json.loads(path.read_text())["teacher"]["ppl"]
            except (OSError, ValueError, KeyError):
                print(f"(no {size} reference for {name}: {path} missing or unfinished)")
    collected = {"references_finetuned_original": references, "recipes": {}}
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
        size = MATCHED[recipe]
        reference = references.get(size, {})
        r["matched_reference"] = size if reference else None
        vs_ref = f"{final['austen'] / reference['austen']:.3f} ({size})" if "austen" in reference else "-"
        vs_ref_py = f"{final['pydocs'] / reference['pydocs']:.3f} ({size})" if "pydocs" in reference else "-"
        cache = r["generation"]["student"]["cache_bytes"] / 2**20
        print(f"| {recipe} | {r['train_tokens']:,} | {final['austen']:.2f} | {vs_ref} | {final['pydocs']:.2f} | "
              f"{final['pydocs'] / original['pydocs']:.3f} | {vs_ref_py} | {cache:.1f} MiB after "
              f"{r['generation']['student']['context']} tokens |")
    for size, reference in references.items():
        print(f"\nreference: the original finetuned (LoRA 8, LM loss) on the first {size} tokens: "
              + ", ".join(f"{k} {v:.2f}" for k, v in reference.items()))
    if missing:
        print(f"\nnot run (no pipeline.json): {', '.join(missing)}")
    if args.json:
        Path(args.json).write_text(json.dumps(collected, indent=2) + "\n")


if __name__ == "__main__":
    main()
