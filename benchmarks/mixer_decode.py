"""Decode cost of every mixer on the real default model: ms per token and state bytes at growing contexts, one decode
step of each model in turn (so that other load on the machine hits them alike), beside the original with its KV cache.
The converted models are untrained swaps (speed and state size do not depend on the weights' values).

    python benchmarks/mixer_decode.py --contexts 1k,4k,16k --json docs/mixers/decode.json

Contexts past --prefill-cap-s are filled by extending a shorter real prefill (t2r bench's rule: a recurrent state is
kept as it is with its token count set, softmax keys/values are tiled), so 16k costs no 16k-token prefill.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import statistics

import torch

import t2r
from t2r.bench import BenchSettings, parse_sizes
from t2r.bench.measure import machine_info, measure_rows
from t2r.io import write_json
from t2r.sources import load_model

MIXERS = {  # name: convert keywords beside the Hedgehog feature map of 64 features
    "linear": dict(mixer="linear"),
    "window-64": dict(mixer="window", window=64),
    "gla": dict(mixer="gla"),
    "gla-window-64": dict(mixer="gla", window=64),
    "delta": dict(mixer="delta"),
    "gated_delta": dict(mixer="gated_delta"),
    "gated_delta-window-64": dict(mixer="gated_delta", window=64),
}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="model to convert (default: the embedded SmolLM2-135M)")
    p.add_argument("--contexts", default="1k,4k,16k")
    p.add_argument("--mixers", default=",".join(MIXERS))
    p.add_argument("--decode-tokens", type=int, default=16)
    p.add_argument("--prefill-cap-s", type=float, default=20.0)
    p.add_argument("--json", dest="out", default=None)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    base, _, _ = load_model(args.model)
    models = {"original": base.eval()}
    for name in args.mixers.split(","):
        models[name] = t2r.convert(copy.deepcopy(base), feature_map="hedgehog", feature_dim=64,
                                   **MIXERS[name]).eval()
    options = BenchSettings(contexts=args.contexts, batch="1", decode_tokens=args.decode_tokens,
                            prefill_cap_s=args.prefill_cap_s)
    rows = measure_rows(models, options, device=torch.device("cpu"), vocab=base.config.vocab_size)
    table = {}
    for row in rows:
        table.setdefault(row["model"], {})[row["context"]] = {
            "ms_per_token": round(row["decode_ms_per_token"], 2), "state_bytes": row["cache_bytes"],
            "cache_fill": row["cache_fill"]}
    result = {"machine": machine_info(torch.device("cpu")), "threads": torch.get_num_threads(),
              "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "contexts": parse_sizes(args.contexts),
              "decode_tokens": args.decode_tokens, "table": table, "rows": rows,
              "ms_ratio_to_linear": {m: {c: round(v["ms_per_token"] / table["linear"][c]["ms_per_token"], 2)
                                         for c, v in t.items()} for m, t in table.items() if "linear" in table}}
    print(json.dumps({"table": table, "ms_ratio_to_linear": result["ms_ratio_to_linear"]}, indent=1))
    if args.out:
        write_json(args.out, result)
    medians = {m: statistics.median(v["ms_per_token"] for v in t.values()) for m, t in table.items()}
    logging.info("median ms/token over contexts: %s", medians)


if __name__ == "__main__":
    main()
