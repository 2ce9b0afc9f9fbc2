"""How long `t2r --help`, `t2r COMMAND --help` and `t2r --version` take to answer (process start to exit).

    python benchmarks/cli_startup.py                          # this checkout's src/
    python benchmarks/cli_startup.py --src /path/to/other/src --json before.json   # another checkout, to compare

Each command runs `--repeats` times in a fresh `python -m t2r` process with PYTHONPATH set to --src; the table shows
the median and the fastest run in seconds. A figure for docs/RESULTS.md is one run of this script, machine named.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

COMMANDS = [["--help"], ["--version"], ["convert", "--help"], ["distill", "--help"], ["eval", "--help"],
            ["convert", "--feature-map", "nope"]]


def time_command(args: list[str], src: Path, repeats: int) -> list[float]:
    env = {**os.environ, "PYTHONPATH": str(src), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "t2r", *args], env=env, capture_output=True, check=False)
        seconds.append(time.perf_counter() - start)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--src", type=Path, default=Path(__file__).resolve().parents[1] / "src",
                        help="the src/ folder whose t2r to time")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    rows = []
    print(f"{'command':36} {'median s':>9} {'fastest s':>9}")
    for command in COMMANDS:
        seconds = time_command(command, args.src, args.repeats)
        rows.append({"command": "t2r " + " ".join(command), "median_s": round(statistics.median(seconds), 3),
                     "fastest_s": round(min(seconds), 3), "runs": [round(s, 3) for s in seconds]})
        print(f"{rows[-1]['command']:36} {rows[-1]['median_s']:9.2f} {rows[-1]['fastest_s']:9.2f}")
    if args.json:
        args.json.write_text(json.dumps({"src": str(args.src), "python": sys.version.split()[0], "rows": rows},
                                        indent=2) + "\n")


if __name__ == "__main__":
    main()
