"""Peak memory of reading one long document, by length: a converted model carries a fixed-size state from chunk to
chunk, the original a KV cache that grows. Each (model, length) runs in a fresh process, so its peak resident set
size is its own.

    python benchmarks/memory_flat.py runs/m-swap --lengths 2k,4k,8k,16k --json docs/memory/flat.json
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

from t2r.bench import parse_sizes
from t2r.io import write_json

CHILD = r"""
import json, resource, sys, time, torch, t2r
from t2r.adapters import cache_bytes, original_model
from t2r.generate import new_cache
from t2r.longeval import PositionSettings, document_nll
path, which, length, chunk = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
model = t2r.load(path)
model = original_model(model) if which == "original" else model
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
ids = torch.randint(100, 40000, (1, length), generator=torch.Generator().manual_seed(0))
start = time.perf_counter()
nll = document_nll(model, ids, PositionSettings(chunk=chunk))
seconds = time.perf_counter() - start
print(json.dumps({"model": which, "length": length, "seconds": seconds, "tokens_per_s": length / seconds,
                  "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                  "peak_rss_after_load_bytes": before, "finite": bool(torch.isfinite(nll).all())}))
"""


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="directory of a converted model")
    p.add_argument("--lengths", default="2k,4k,8k,16k")
    p.add_argument("--chunk", type=int, default=512)
    p.add_argument("--which", default="converted,original")
    p.add_argument("--json", dest="out", default=None)
    args = p.parse_args(argv)
    rows = []
    for which in args.which.split(","):
        for length in parse_sizes(args.lengths, "--lengths"):
            out = subprocess.run([sys.executable, "-c", CHILD, args.model, which, str(length), str(args.chunk)],
                                 capture_output=True, text=True, check=True)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            r = rows[-1]
            print(f"{which:9} {length:6d} tokens: peak RSS {r['peak_rss_bytes'] / 2**20:7.0f} MiB "
                  f"(after loading {r['peak_rss_after_load_bytes'] / 2**20:6.0f} MiB), {r['tokens_per_s']:6.0f} tok/s",
                  flush=True)
    result = {"model": args.model, "chunk": args.chunk, "rows": rows, "time": time.strftime("%Y-%m-%d %H:%M"),
              "this_process_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    if args.out:
        write_json(args.out, result)


if __name__ == "__main__":
    main()
