"""The README's first Usage block, read from README.md itself and run as written, top to bottom, in a fresh folder,
offline, on the embedded SmolLM2 (minutes): what a newcomer types works. docs/USAGE.md walks through the same
commands, so every command there must be in this block."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def usage_block(readme: str) -> str:
    """The first fenced block after the `## Usage` heading."""
    usage = readme[readme.index("\n## Usage"):]
    return re.search(r"\n```\n(.*?)\n```", usage, re.S).group(1)


def commands(block: str) -> list[str]:
    """The block's command lines, comments removed."""
    lines = [re.sub(r"\s+#.*$", "", line).strip() for line in block.splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def shell_blocks(markdown: str) -> list[str]:
    return re.findall(r"\n```(?:bash|sh)?\n(.*?)\n```", markdown, re.S)


def test_the_usage_block_is_a_first_session():
    """It starts from the embedded default and needs no file, directory or hub id of the user's."""
    block = commands(usage_block((ROOT / "README.md").read_text()))
    assert block[0].startswith("t2r convert --") and len(block) >= 8
    assert not any("path/to" in line or "HuggingFaceTB" in line or "..." in line for line in block)


def test_usage_walkthrough_runs_only_commands_of_the_readme_block():
    block = set(commands(usage_block((ROOT / "README.md").read_text())))
    walkthrough = [c for b in shell_blocks((ROOT / "docs/USAGE.md").read_text()) for c in commands(b)
                   if c.startswith(("t2r ", "printf "))]
    assert walkthrough and all(c in block for c in walkthrough), [c for c in walkthrough if c not in block]


@pytest.mark.slow
def test_readme_usage_block_runs_as_written(tmp_path):
    script = "\n".join(commands(usage_block((ROOT / "README.md").read_text())))
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    prelude = f't2r() {{ "{sys.executable}" -m t2r "$@"; }}\nset -euo pipefail\nset -x\n'
    start = time.perf_counter()
    proc = subprocess.run(["bash", "-c", prelude + script], cwd=tmp_path, env=env, capture_output=True, text=True,
                          check=False)
    seconds = time.perf_counter() - start
    (tmp_path / "transcript.txt").write_text(proc.stdout + "\n---- stderr ----\n" + proc.stderr)
    print(f"README Usage block: {seconds:.0f} s; transcript: {tmp_path / 'transcript.txt'}")  # shown with -s
    assert proc.returncode == 0, proc.stderr[-4000:]
    for folder in ("runs/smol-rnn", "runs/smol-at", "runs/smol-ft", "data/austen", "runs/demo-small"):
        assert (tmp_path / folder).is_dir(), folder
    assert "OK (" in proc.stdout  # verify
    assert "converted / original perplexity" in proc.stdout  # eval
    assert "turn(s)" in proc.stdout  # chat
    assert "## Training curves" in (tmp_path / "runs/demo-small/report.md").read_text()
