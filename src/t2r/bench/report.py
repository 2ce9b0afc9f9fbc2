"""The report of a `t2r.bench` result: original / converted ratios, the human-readable table with what the ratios
mean for the user's model and the matplotlib plot, and this project's development targets as met / not met lines
(printed by benchmarks/bench_targets.py, never by `t2r bench`). Nothing here measures; every function reads the
result's rows."""

from __future__ import annotations

import math
from pathlib import Path

from ..errors import T2RError
from ..units import fmt_bytes

MODELS = ("original", "converted")


def ratios(rows: list[dict]) -> list[dict]:
    """original / converted per (context, batch): decode time, cache bytes, prefill time."""
    by_key = {(r["model"], r["context"], r["batch"]): r for r in rows}
    out = []
    for (model, context, batch), conv in by_key.items():
        orig = by_key.get(("original", context, batch))
        if model != "converted" or orig is None:
            continue
        entry = {"context": context, "batch": batch,
                 "decode_ms_ratio": orig["decode_ms_per_token"] / conv["decode_ms_per_token"],
                 "cache_bytes_ratio": orig["cache_bytes"] / max(conv["cache_bytes"], 1),
                 "prefill_time_ratio": None}
        if orig["prefill_tokens_per_s"] and conv["prefill_tokens_per_s"]:
            entry["prefill_time_ratio"] = conv["prefill_tokens_per_s"] / orig["prefill_tokens_per_s"]
        out.append(entry)
    return out


# --- this project's development targets (benchmarks/bench_targets.py) ------------------------------------------------------------------------------------------

def _row(rows, model, context, batch):
    return next((r for r in rows if (r["model"], r["context"], r["batch"]) == (model, context, batch)), None)


def _target(name: str, value: float | None, threshold: float, higher_is_better: bool, detail: str = "") -> dict:
    met = None if value is None else (value >= threshold if higher_is_better else value <= threshold)
    return {"target": name, "value": value, "threshold": threshold, "met": met, "detail": detail,
            "higher_is_better": higher_is_better}


def targets(result: dict) -> list[dict]:
    """The issue's targets, evaluated on this run (met None: not measured in this run)."""
    rows, contexts, batches = result["rows"], result["contexts"], result["batches"]
    lo, hi, b1 = contexts[0], contexts[-1], batches[0]
    ms = {(r["model"], r["context"], r["batch"]): r["decode_ms_per_token"] for r in rows}
    conv = [ms[("converted", c, b1)] for c in contexts if ("converted", c, b1) in ms]
    out = [_target(f"converted decode flat: ms/token at {hi} / at {lo} (batch {b1})",
                   ms[("converted", hi, b1)] / ms[("converted", lo, b1)], 1.10, False),
           _target(f"slowest converted decode / original decode at {lo} (batch {b1})",
                   max(conv) / ms[("original", lo, b1)], 1.0, False),
           _target("slowest converted decode / weight-reading floor (batch 1)",
                   max(conv) / result["weight_floor_ms"] if b1 == 1 else None, 1.2, False),
           _target(f"original / converted decode time at {hi} (batch {b1})",
                   ms[("original", hi, b1)] / ms[("converted", hi, b1)], 3.0, True)]
    big = (8 in batches and 4096 in contexts)
    out.append(_target("original / converted decode time (= tokens/s ratio) at 4096, batch 8",
                       ms[("original", 4096, 8)] / ms[("converted", 4096, 8)] if big else None, 4.0, True))
    for b in batches:
        sizes = {r["cache_bytes"] for r in rows if r["model"] == "converted" and r["batch"] == b}
        out.append(_target(f"converted state bytes distinct values across contexts (batch {b})", len(sizes), 1,
                           False, f"state {sorted(sizes)} B; KV cache of the original: " + ", ".join(
                               f"{r['context']}: {r['cache_bytes']}" for r in rows
                               if r["model"] == "original" and r["batch"] == b)))
    tps = {(r["model"], r["context"]): r["prefill_tokens_per_s"] for r in rows if r["batch"] == b1}
    orig4k = tps.get(("original", 4096))
    for c in (4096, 16384):
        value = tps.get(("converted", c)) / orig4k if orig4k and tps.get(("converted", c)) else None
        out.append(_target(f"converted prefill tokens/s at {c} / original's at 4096", value, 1.0, True))
    real = [(c, tps[("converted", c)]) for c in contexts if tps.get(("converted", c))]
    base = next(((c, t) for c, t in real if c >= 1024), real[0] if real else None)
    exponent = None
    if base and real and real[-1][0] > base[0]:  # time ~ L^p: p = 1 + log(tps_base / tps_last) / log(L ratio)
        exponent = 1 + math.log(base[1] / real[-1][1]) / math.log(real[-1][0] / base[0])
    out.append(_target(f"converted prefill time growth exponent p (time ~ L^p) from {base and base[0]} to "
                       f"{real and real[-1][0]}", exponent, 1.15, False))
    out += variant_targets(result)
    train = result.get("train_tokens_per_s")
    out.append(_target(f"training tokens/s (fwd+bwd, seq {train and train['seq']}) converted / original",
                       train["converted"] / train["original"] if train else None, 1.0, True))
    return out


def variant_targets(result: dict) -> list[dict]:
    """Issue 16's targets for the rows beside original/converted, where the run has them."""
    rows, contexts, b1 = result["rows"], result["contexts"], result["batches"][0]
    ms = {(r["model"], r["context"], r["batch"]): r["decode_ms_per_token"] for r in rows}
    names = {r["model"] for r in rows}
    out = []
    for name in ("converted-int8", "converted-fp16"):
        if name in names:
            worst = max(ms[(name, c, b1)] / ms[("converted", c, b1)] for c in contexts)
            out.append(_target(f"{name} / converted decode time, worst context (batch {b1})", worst, 0.5, False))
    for name in ("converted-compiled", "converted-int8-compiled", "converted-fp16-compiled"):
        if name in names:
            out.append(_target(f"{name} decode at {contexts[0]} / weight-reading floor (batch {b1})",
                               ms[(name, contexts[0], b1)] / result["weight_floor_ms"] if b1 == 1 else None, 1.2,
                               False))
            out.append(_target(f"{name} decode / original decode at {contexts[0]} (batch {b1})",
                               ms[(name, contexts[0], b1)] / ms[("original", contexts[0], b1)], 1.0, False))
    llama = {r["context"]: r.get("decode_ms_per_token") for r in (result.get("llamacpp") or {}).get("rows", [])}
    if llama:
        best = {c: min(v for (n, cc, b), v in ms.items() if n.startswith("converted") and cc == c and b == 1)
                for c in contexts if ("converted", c, 1) in ms}
        for c in (c for c in contexts if c >= 1024 and llama.get(c) and c in best):
            out.append(_target(f"llama.cpp / best converted decode time at {c} (batch 1)", llama[c] / best[c],
                               3.0 if c >= 16384 else 1.0, True))
    return out


# --- output -------------------------------------------------------------------------------------------------------

def _fmt(x, spec: str = ".1f") -> str:
    return "-" if x is None else format(x, spec)


def render_bench(result: dict) -> str:
    """The human-readable table of a `bench` result."""
    rows, m = result["rows"], result["machine"]
    lines = [f"{m['cpu']} ({m['cpu_count']} cpus{', ' + m['gpu'] if 'gpu' in m else ''}), torch {result['torch']}, "
             f"{result['threads']} threads, {result['dtype']}, device {m['device']}",
             f"{'context':>7} {'batch':>5} | {'ms/token orig':>13} {'conv':>7} {'ratio':>6} | "
             f"{'prefill tok/s orig':>18} {'conv':>7} | {'KV cache':>10} {'state':>10} | {'peak RSS':>9}"]
    for r in ratios(rows):
        o, c = (_row(rows, n, r["context"], r["batch"]) for n in MODELS)
        lines.append(f"{o['context']:>7} {o['batch']:>5} | {o['decode_ms_per_token']:>13.1f} "
                     f"{c['decode_ms_per_token']:>7.1f} {r['decode_ms_ratio']:>6.2f} | "
                     f"{_fmt(o['prefill_tokens_per_s'], '.0f'):>18} {_fmt(c['prefill_tokens_per_s'], '.0f'):>7} | "
                     f"{fmt_bytes(o['cache_bytes']):>10} {fmt_bytes(c['cache_bytes']):>10} | "
                     f"{fmt_bytes(max(o['peak_rss_bytes'], c['peak_rss_bytes'])):>9}")
    lines.append(f"weight-reading floor: {result['weight_floor_ms']:.1f} ms")
    lines += render_variants(result)
    g = result.get("generate_loop")
    if g:
        lines.append(f"HF generate vs lean decode (context {g['context']}, batch 1), ms/token: " + "; ".join(
            f"{n} {g[n]['hf_generate_ms_per_token']:.1f} -> {g[n]['lean_decode_ms_per_token']:.1f}"
            for n in MODELS if n in g))
    t = result.get("train_tokens_per_s")
    if t:
        lines.append(f"training (fwd+bwd, seq {t['seq']}, batch 1) tokens/s: original {t['original']:.0f}, "
                     f"converted {t['converted']:.0f}")
    return "\n".join(lines + summary(result))


def summary(result: dict) -> list[str]:
    """What the table means, in the user's figures: speed and memory at the longest context, the state's size."""
    rows, b1 = result["rows"], result["batches"][0]
    at = {r["context"]: r for r in ratios(rows) if r["batch"] == b1}
    if not at:
        return []
    hi = max(at)
    o, c = (_row(rows, n, hi, b1) for n in MODELS)
    speed = at[hi]["decode_ms_ratio"]
    lines = [f"at {hi} tokens (batch {b1}) the converted model decodes "
             + (f"{speed:.2f}x as fast as the original" if speed >= 1 else f"at {speed:.2f}x the original's speed")
             + f", and keeps {fmt_bytes(c['cache_bytes'])} of state against a {fmt_bytes(o['cache_bytes'])} KV cache"]
    sizes = {r["cache_bytes"] for r in rows if r["model"] == "converted" and r["batch"] == b1}
    if len(sizes) == 1 and len(at) > 1:
        lines.append(f"its state is the same size at every context measured ({', '.join(map(str, sorted(at)))})")
    return lines


def render_targets(targets: list[dict]) -> str:
    """The development targets as `[met]` / `[NOT met]` / `[not measured]` lines (benchmarks/bench_targets.py)."""
    lines = []
    for tg in targets:
        verdict = {True: "met", False: "NOT met", None: "not measured"}[tg["met"]]
        lines.append(f"[{verdict}] {tg['target']}: {_fmt(tg['value'], '.3g')} "
                     f"({'>=' if tg.get('higher_is_better') else '<='} "
                     f"{tg['threshold']})")
    return "\n".join(lines)


def render_variants(result: dict) -> list[str]:
    """Lines for the rows beside original/converted (int8, compiled, llama.cpp), each with its ratio to the float32
    converted row of the same context and batch."""
    rows = result["rows"] + (result.get("llamacpp") or {}).get("rows", [])
    lines = []
    for name in sorted({r["model"] for r in rows} - set(MODELS)):
        cells = []
        for r in sorted((r for r in rows if r["model"] == name), key=lambda r: (r["batch"], r["context"])):
            base = _row(result["rows"], "converted", r["context"], r["batch"])
            ms = r.get("decode_ms_per_token")
            ratio = f" ({ms / base['decode_ms_per_token']:.2f}x conv)" if ms and base else ""
            cells.append(f"{r['context']}x{r['batch']} {_fmt(ms)}{ratio}")
        lines.append(f"{name} ms/token: " + "; ".join(cells))
    skipped = (result.get("llamacpp") or {}).get("skipped")
    if skipped:
        lines.append(skipped)
    return lines


def plot_bench(result: dict, path: str | Path) -> Path:
    """PNG: decode ms/token vs context (log x) per model and batch with the floor; cache bytes vs context."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise T2RError("--plot needs matplotlib: pip install matplotlib (or t2r[bench])") from None
    fig = Figure(figsize=(10, 4), dpi=100)
    FigureCanvasAgg(fig)
    speed, memory = fig.subplots(1, 2)
    styles = {"original": ("tab:red", "o"), "converted": ("tab:blue", "s")}
    for (name, batch) in sorted({(r["model"], r["batch"]) for r in result["rows"]}):
        rows = sorted((r for r in result["rows"] if (r["model"], r["batch"]) == (name, batch)),
                      key=lambda r: r["context"])
        color, marker = styles.get(name, (None, "^"))
        dash = "-" if batch == result["batches"][0] else "--"
        xs = [r["context"] for r in rows]
        speed.plot(xs, [r["decode_ms_per_token"] for r in rows], dash, color=color, marker=marker,
                   label=f"{name}, batch {batch}")
        memory.plot(xs, [r["cache_bytes"] / 2**20 for r in rows], dash, color=color, marker=marker,
                    label=f"{name}, batch {batch}")
    speed.axhline(result["weight_floor_ms"], color="gray", linestyle=":", label="weight-reading floor")
    speed.set(xscale="log", yscale="log", xlabel="context (tokens)", ylabel="decode ms / token (log)",
              title="decode step time")
    memory.set(xscale="log", yscale="log", xlabel="context (tokens)", ylabel="MiB", title="KV cache / state")
    for ax in (speed, memory):
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"{result['model'] or 'model'}: {result['machine']['cpu']}, {result['threads']} threads, "
                 f"{result['dtype']}", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path
