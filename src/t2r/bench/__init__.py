"""Speed and memory of a converted model against its original: the measurements (measure.py) and their ratios,
target checks, table and plot (report.py). `t2r bench` is the command."""

from .measure import copy_cache, parse_sizes, peak_rss_bytes, predict_seconds, run_bench, weight_floor_ms
from .report import plot_bench, ratios, render_bench, targets

__all__ = ["copy_cache", "parse_sizes", "peak_rss_bytes", "plot_bench", "predict_seconds", "ratios", "render_bench",
           "run_bench", "targets", "weight_floor_ms"]
