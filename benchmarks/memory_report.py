"""Merge the per-model results of benchmarks/memory.py (runs/memory/<name>/memory.json) into one JSON, markdown
tables for docs/RESULTS.md and the plots: loss by position per corpus (every model), passkey heat maps.

    python benchmarks/memory_report.py runs/memory --out docs/memory
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from t2r.io import write_json, write_text
from t2r.longeval import plot_positions
from t2r.recall import plot_recall


def merge(folder: Path) -> dict:
    merged = {"models": {}, "data": [], "args": {}}
    for path in sorted(folder.glob("*/memory.json")):
        run = json.loads(path.read_text())
        merged["args"][path.parent.name] = run["args"]
        merged["data"] = merged["data"] or run["data"]
        for name, model in run["models"].items():  # a later run of the same model adds corpora and ablations
            into = merged["models"].setdefault(name, model)
            if into is not model:
                into.setdefault("positions", {}).update(model.get("positions", {}))
                for part, by_corpus in model.get("ablations", {}).items():
                    into.setdefault("ablations", {}).setdefault(part, {}).update(by_corpus)
    if "original" in merged["models"]:  # the original first
        merged["models"] = {"original": merged["models"].pop("original"), **merged["models"]}
    return merged


def _bucket_name(b: dict) -> str:
    size = lambda n: f"{n // 1024}k" if n >= 1024 else str(n)  # noqa: E731
    return f"{size(b['start'])}-{size(b['end'])}"


def positions_table(merged: dict, corpus: str) -> list[str]:
    rows = []
    for name, r in merged["models"].items():
        if corpus in r.get("positions", {}):
            rows.append((name, r["positions"][corpus]))
        for part, by_corpus in r.get("ablations", {}).items():
            if corpus in by_corpus:
                rows.append((f"{name}, {part} off", by_corpus[corpus]))
    if not rows:
        return []
    names = [_bucket_name(b) for b in max((r["buckets"] for _, r in rows), key=len)]
    lines = [f"| {corpus} held-out: perplexity by position | " + " | ".join(names) + " |",
             "|---|" + "---:|" * len(names)]
    for name, r in rows:
        cells = [f"{b['ppl']:.1f}" for b in r["buckets"]] + ["-"] * (len(names) - len(r["buckets"]))
        stop = f" (read {r['stopped_at']} tokens)" if r.get("stopped_at") else ""
        lines.append(f"| {name}{stop} | " + " | ".join(cells) + " |")
    return lines


def recall_table(merged: dict) -> list[str]:
    models = {n: r for n, r in merged["models"].items() if "passkey" in r or "mqar" in r}
    if not models:
        return []
    with_cells = [r for r in models.values() if "passkey" in r]
    cells = [(c["length"], c["depth"]) for c in with_cells[0]["passkey"]["cells"]] if with_cells else []
    pairs = next(r["mqar"] for r in models.values() if "mqar" in r)["cells"]
    lines = ["| passkey accuracy (log-likelihood / generation) | " + " | ".join(f"{n} @ {d:g}" for n, d in cells)
             + " | MQAR " + ", ".join(str(c["pairs"]) for c in pairs) + " pairs (log-likelihood / generation) |",
             "|---|" + "---:|" * (len(cells) + 1)]
    for name, r in models.items():
        row = ([f"{c['acc_ll']:.2f} / {c['acc_gen']:.2f}" for c in r["passkey"]["cells"]] if "passkey" in r
               else ["-"] * len(cells))
        mqar = ", ".join(f"{c['acc_ll']:.2f} / {c['acc_gen']:.2f}" for c in r["mqar"]["cells"]) if "mqar" in r else "-"
        lines.append(f"| {name} | " + " | ".join(row) + f" | {mqar} |")
    chance = next(r for r in models.values() if "mqar" in r)["mqar"]["chance"]
    return lines + ["", f"Chance: {chance:.2f} (the right answer among {round(1 / chance)} candidates)."]


def plots(merged: dict, out: Path) -> list[Path]:
    made = []
    for corpus in merged["data"]:
        curves = {n: r["positions"][corpus] for n, r in merged["models"].items() if corpus in r.get("positions", {})}
        if curves:
            made.append(plot_positions(curves, out / f"positions_{corpus}.png",
                                       title=f"loss by position, {corpus} held-out (16k-token documents)"))
    original = merged["models"].get("original")
    for name, r in merged["models"].items():
        if name != "original" and "passkey" in r:
            pair = {"teacher": original["passkey"], "student": r["passkey"]} if original else r["passkey"]
            made.append(plot_recall(pair, out / f"passkey_{name}.png"))
    return made


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("folder", type=Path)
    p.add_argument("--out", type=Path, default=Path("docs/memory"))
    args = p.parse_args(argv)
    merged = merge(args.folder)
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "memory.json", merged)
    lines = []
    for corpus in merged["data"]:
        lines += positions_table(merged, corpus) + [""]
    lines += recall_table(merged)
    write_text(args.out / "tables.md", "\n".join(lines) + "\n")
    made = plots(merged, args.out)
    print("\n".join(lines))
    print("\n".join(str(m) for m in made))


if __name__ == "__main__":
    main()
