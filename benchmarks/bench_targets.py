"""This project's development targets for the speed benchmark (issue 4), checked on a `t2r bench --out-json` file:
one `[met]` / `[NOT met]` / `[not measured]` line each. `t2r bench` itself shows the user's figures and ratios only.

    python benchmarks/bench_targets.py docs/bench_smollm2.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from t2r.bench import render_targets, targets


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("result", type=Path, help="the JSON written by `t2r bench --out-json`")
    result = json.loads(parser.parse_args().result.read_text())
    print(render_targets(targets(result)))


if __name__ == "__main__":
    main()
