"""How long `t2r --help`, `t2r COMMAND --help` and `t2r --version` take to answer (process start to exit).

    python benchmarks/cli_startup.py                          # this checkout's src/
    python benchmarks/cli_startup.py --src /path/to/other/src --json before.json   # another checkout, to compare
    python benchmarks/cli_startup.py --refusal      # also: convert refusing a 250 MB GGUF of an unsupported family

Each command runs `--repeats` times in a fresh `python -m t2r` process with PYTHONPATH set to --src; the table shows
the median and the fastest run in seconds, and the median CPU seconds (user + system, what a busy machine does not
inflate). A figure for docs/RESULTS.md is one run of this script, machine named.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import struct
import tempfile
import statistics
import subprocess
import sys
import time
from pathlib import Path

COMMANDS = [["--help"], ["--version"], ["convert", "--help"], ["distill", "--help"], ["eval", "--help"],
            ["convert", "--feature-map", "nope"]]


def time_command(args: list[str], src: Path, repeats: int) -> tuple[list[float], list[float]]:
    """Wall and CPU seconds of each run."""
    env = {**os.environ, "PYTHONPATH": str(src), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    seconds, cpu = [], []
    for _ in range(repeats):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "t2r", *args], env=env, capture_output=True, check=False)
        seconds.append(time.perf_counter() - start)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu.append(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime)
    return seconds, cpu


def unsupported_gguf(folder: Path, megabytes: int = 250) -> Path:
    """A sparse GGUF file of `megabytes` whose header names an architecture no adapter converts (falcon)."""
    def string(text: str) -> bytes:
        return struct.pack("<Q", len(text)) + text.encode()

    path = folder / "falcon.gguf"
    with open(path, "wb") as f:
        f.write(b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + string("general.architecture") + struct.pack("<I", 8)
                + string("falcon"))
        f.truncate(megabytes << 20)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--src", type=Path, default=Path(__file__).resolve().parents[1] / "src",
                        help="the src/ folder whose t2r to time")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--refusal", action="store_true", help="also time `t2r convert` refusing a 250 MB GGUF of "
                                                               "an unsupported family")
    args = parser.parse_args()
    rows, scratch = [], tempfile.TemporaryDirectory()
    commands = list(COMMANDS)
    if args.refusal:
        commands.append(["convert", str(unsupported_gguf(Path(scratch.name))), "--out", f"{scratch.name}/out"])
    print(f"{'command':36} {'median s':>9} {'fastest s':>9} {'CPU s':>6}")
    for command in commands:
        seconds, cpu = time_command(command, args.src, args.repeats)
        shown = " ".join(Path(a).name if a.startswith(scratch.name) else a for a in command)
        rows.append({"command": "t2r " + shown, "median_s": round(statistics.median(seconds), 3),
                     "fastest_s": round(min(seconds), 3), "cpu_s": round(statistics.median(cpu), 3),
                     "runs": [round(s, 3) for s in seconds]})
        print(f"{rows[-1]['command'][:36]:36} {rows[-1]['median_s']:9.2f} {rows[-1]['fastest_s']:9.2f} "
              f"{rows[-1]['cpu_s']:6.2f}")
    if args.json:
        args.json.write_text(json.dumps({"src": str(args.src), "python": sys.version.split()[0], "rows": rows},
                                        indent=2) + "\n")


if __name__ == "__main__":
    main()
