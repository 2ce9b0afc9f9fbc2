"""The loss plot of a training run: RUN/loss.png from RUN/metrics.jsonl (needs matplotlib, the `bench` extra)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from .checkpoint import METRICS

log = logging.getLogger(__name__)
PLOT = "loss.png"


def read_metrics(run: Path) -> list[dict]:
    path = Path(run) / METRICS
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def _series(records: list[dict], kind: str, key: str) -> tuple[list[int], list[float]]:
    rows = [r for r in records if r.get("kind") == kind and isinstance(r.get(key), (int, float))]
    return [r["tokens"] for r in rows], [float(r[key]) for r in rows]


def plot_metrics(run: str | Path, title: str = "") -> Path | None:
    """Write RUN/loss.png: the training loss against tokens (left) and each held-out evaluation (right: perplexity,
    or the transfer error where the stage reports no perplexity). None, with a log line, without matplotlib or
    metrics."""
    records = read_metrics(Path(run))
    if not records:
        return None
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        log.info("no loss plot: matplotlib is not installed (pip install 't2r[bench]')")
        return None
    held_out = next((k for k in ("ppl", "transfer_mse") if _series(records, "eval", k)[0]), None)
    fig = Figure(figsize=(9, 3.5), dpi=100)
    FigureCanvasAgg(fig)
    train_ax, eval_ax = fig.subplots(1, 2)
    tokens, loss = _series(records, "train", "loss")
    train_ax.plot(tokens, loss, color="tab:blue", linewidth=0.8)
    train_ax.set(xlabel="tokens", ylabel="training loss", title="training")
    if held_out:
        tokens, values = _series(records, "eval", held_out)
        eval_ax.plot(tokens, values, "o-", color="tab:red")
    eval_ax.set(xlabel="tokens", ylabel=f"held-out {held_out or '-'}", title="held-out evaluations")
    for ax in (train_ax, eval_ax):
        ax.grid(True, alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path = Path(run) / PLOT
    fig.savefig(path)
    return path
