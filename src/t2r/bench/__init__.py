"""Speed and memory of a converted model against its original: what to measure (settings.py), the measurements
(measure.py) and their ratios, target checks, table and plot (report.py). `t2r bench` is the command. Each name is
imported on first use (`t2r.lazy`): the settings and the report do not need torch."""

from ..lazy import lazy_exports

_EXPORTS = {
    **dict.fromkeys(["copy_cache", "peak_rss_bytes", "predict_seconds", "run_bench", "weight_floor_ms"], ".measure"),
    **dict.fromkeys(["plot_bench", "ratios", "render_bench", "render_targets", "summary", "targets"], ".report"),
    **dict.fromkeys(["BenchSettings", "parse_sizes"], ".settings"),
}
__getattr__ = lazy_exports(__name__, _EXPORTS)
__all__ = sorted(_EXPORTS)
