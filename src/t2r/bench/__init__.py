"""Speed and memory of a converted model against its original: what to measure (settings.py), the measurements
(measure.py) and their ratios, target checks, table and plot (report.py). `t2r bench` is the command."""

from .measure import copy_cache, peak_rss_bytes, predict_seconds, run_bench, weight_floor_ms
from .report import plot_bench, ratios, render_bench, targets
from .settings import BenchSettings, parse_sizes

__all__ = ["BenchSettings", "copy_cache", "parse_sizes", "peak_rss_bytes", "plot_bench", "predict_seconds", "ratios",
           "render_bench", "run_bench", "targets", "weight_floor_ms"]
