"""Does the RNN remember? Loss by position over long held-out documents (with evaluation-time ablations), passkey
retrieval and multi-query associative recall, for converted models beside their original: the figures of
docs/RESULTS.md ("Memory"). Results are written after every model, so an interrupted run keeps what it measured.

    python benchmarks/memory.py --model swap=runs/swap --model demo=runs/demo/distill --data austen,kjv,pydocs \
        --length 16384 --docs 1 --passkey-lengths 1k,2k,4k --depths 0,0.5,1 --samples 4 --out docs/memory

The original (softmax) model is rebuilt from the first converted model's weights and measured first (its KV cache
grows with the document; `--teacher-cache-gb` caps it and the result says where it stopped).
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import time
from pathlib import Path

import torch

from t2r.ablation import PARTS, ablated
from t2r.adapters import original_model
from t2r.errors import T2RError
from t2r.io import write_json
from t2r.longeval import PositionSettings, long_documents, plot_positions, position_losses, trained_context
from t2r.persistence import load, load_tokenizer
from t2r.recall import RecallSettings, parse_depths, parse_lengths, parse_pairs, plot_recall, run_recall

log = logging.getLogger("memory")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", action="append", required=True, help="NAME=DIR of a converted model (repeatable)")
    p.add_argument("--data", default="austen,kjv,pydocs", help="held-out corpora, comma-separated")
    p.add_argument("--length", type=int, default=16384, help="tokens per long document (<= 16384)")
    p.add_argument("--docs", type=int, default=1, help="documents per corpus")
    p.add_argument("--chunk", type=int, default=512, help="tokens per forward, carrying the cache")
    p.add_argument("--ablate", default=",".join(PARTS), help="ablations for converted models ('' for none)")
    p.add_argument("--ablate-data", default=None, help="corpora for the ablations (default: all of --data)")
    p.add_argument("--passkey-lengths", default="1k,2k,4k")
    p.add_argument("--depths", default="0,0.5,1")
    p.add_argument("--mqar-pairs", default="8,32")
    p.add_argument("--samples", type=int, default=4, help="samples per recall cell")
    p.add_argument("--tasks", default="passkey,mqar", help="recall tasks to run ('' for none)")
    p.add_argument("--ablate-recall", action="store_true",
                   help="also run the recall tasks under each --ablate part (which part finds the key)")
    p.add_argument("--teacher-cache-gb", type=float, default=8.0, help="stop the original's reading past this KV")
    p.add_argument("--skip-original", action="store_true")
    p.add_argument("--out", default="docs/memory", help="folder for memory.json and the plots")
    return p.parse_args(argv)


def measure(model, tokenizer, docs: dict, args, *, converted: bool, cache_cap: int | None) -> dict:
    """Loss by position on every corpus (+ each applicable ablation), passkey and MQAR for one model."""
    settings = PositionSettings(chunk=args.chunk, max_cache_bytes=cache_cap)
    row = {"trained_context": trained_context(model), "positions": {}, "ablations": {}}
    for corpus, ids in docs.items():
        start = time.perf_counter()
        row["positions"][corpus] = position_losses(model, ids, settings)
        log.info("%s: %.0f s", corpus, time.perf_counter() - start)
        ablate = converted and corpus in (args.ablate_data or args.data).split(",")
        for part in [p for p in args.ablate.split(",") if p] if ablate else []:
            try:
                with ablated(model, part):
                    row["ablations"].setdefault(part, {})[corpus] = position_losses(model, ids, settings)
            except T2RError as err:  # a part the model does not have
                row["ablations"][part] = {"skipped": str(err)}
    recall = {"passkey": RecallSettings(task="passkey", lengths=parse_lengths(args.passkey_lengths),
                                        depths=parse_depths(args.depths), samples=args.samples),
              "mqar": RecallSettings(task="mqar", pairs=parse_pairs(args.mqar_pairs), samples=args.samples)}
    for task, recall_settings in [(t, recall[t]) for t in args.tasks.split(",") if t]:
        start = time.perf_counter()
        row[task] = run_recall(model, tokenizer, recall_settings)
        log.info("%s: %.0f s", task, time.perf_counter() - start)
        for part in [p for p in args.ablate.split(",") if p] if converted and args.ablate_recall else []:
            try:
                with ablated(model, part):
                    row.setdefault("recall_ablations", {}).setdefault(part, {})[task] = run_recall(
                        model, tokenizer, recall_settings)
            except T2RError as err:
                row.setdefault("recall_ablations", {})[part] = {"skipped": str(err)}
    row["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return row


def plots(results: dict, out: Path) -> None:
    models = {n: r for n, r in results["models"].items() if "positions" in r}
    for corpus in results["data"]:
        curves = {n: r["positions"][corpus] for n, r in models.items() if corpus in r["positions"]}
        for name, r in models.items():
            for part, by_corpus in r["ablations"].items():
                if corpus in by_corpus:
                    curves[f"{name}, {part} off"] = by_corpus[corpus]
        plot_positions(curves, out / f"positions_{corpus}.png", title=f"loss by position: {corpus} held-out")
    original = models.get("original")
    for task in ("passkey", "mqar"):  # each converted model beside the original
        for name, r in models.items():
            if name != "original" and task in r:
                pair = {"teacher": original[task], "student": r[task]} if original and task in original else r[task]
                plot_recall(pair, out / f"{task}_{name}.png")


def main(argv=None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="memory: %(message)s")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    named = [spec.split("=", 1) for spec in args.model]
    first = load(named[0][1])
    tokenizer = load_tokenizer(named[0][1])
    docs = {c: long_documents(c, tokenizer, args.length, args.docs) for c in args.data.split(",")}
    results = {"args": vars(args), "data": list(docs), "threads": torch.get_num_threads(), "models": {}}
    path = out / "memory.json"
    if not args.skip_original:
        log.info("original")
        results["models"]["original"] = measure(original_model(first), tokenizer, docs, args, converted=False,
                                                cache_cap=int(args.teacher_cache_gb * 2**30))
        write_json(path, results)
    for name, directory in named:
        log.info("%s (%s)", name, directory)
        model = first if directory == named[0][1] else load(directory)
        results["models"][name] = {"dir": directory, "recipe": model.config.t2r,
                                   **measure(model, tokenizer, docs, args, converted=True, cache_cap=None)}
        write_json(path, results)
    plots(results, out)
    print(json.dumps({n: {c: [round(b["ppl"], 2) for b in r["positions"][c]["buckets"]] for c in r["positions"]}
                      for n, r in results["models"].items()}, indent=1))


if __name__ == "__main__":
    main()
