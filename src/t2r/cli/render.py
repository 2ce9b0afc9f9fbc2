"""Human-readable text for each command's result (the JSON result is what `--json` prints)."""

from __future__ import annotations

from ..bench import render_bench
from ..units import fmt_bytes
from .recall import render_recall


def _eval_line(name: str, e: dict | None) -> str:
    if not e:
        return f"{name}: -"
    extra = f", transfer mse {e['transfer_mse']:.4g}" if "transfer_mse" in e else ""
    return f"{name}: held-out ppl {e['ppl']:.2f}{extra}"


def render_distill(r: dict) -> str:
    """Human-readable text for `t2r distill`."""
    lines = [f"distilled {r['model']} on {r['data']} -> {r['out']}: {r['steps']} steps, {r['tokens']:,} tokens "
             f"in {r['seconds']} s ({r['train_tokens_per_s']} tokens/s while training, {r['processes']} process(es))",
             _eval_line("before", r.get("eval_before")), _eval_line("after ", r.get("eval_after"))]
    return "\n".join(lines + ([f"loss plot: {r['plot']}"] if r.get("plot") else []))


def render_chat(r: dict) -> str:
    """The line `t2r chat` ends with (the replies were printed as they came)."""
    turns = r["turns"]
    new = sum(t["new_tokens"] for t in turns)
    seconds = sum(t["seconds"] for t in turns)
    return (f"[{len(turns)} turn(s), {new} tokens in {seconds:.1f} s ({new / max(seconds, 1e-9):.1f} tokens/s), "
            f"state {fmt_bytes(r['state_bytes'])} after the last turn]")


def render_finetune(r: dict) -> str:
    """Human-readable text for `t2r finetune`."""
    if "heldout_loss_after" in r:  # on sentence pairs
        return (f"finetuned {r['model']} on {r['data']} ({r['pairs']:,} pairs) -> {r['out']}: {r['steps']} steps, "
                f"{r['target_tokens']:,} target tokens in {r['seconds']} s\nheld-out loss per target token: before "
                f"{r['heldout_loss_before']:.4f}, after {r['heldout_loss_after']:.4f}")
    how = f"LoRA rank {r['lora']} (merged)" if r["lora"] else "full finetuning"
    if r["kd"]:
        how += f" + KD {r['kd']}"
    before, after = r.get("eval_before") or {}, r.get("eval_after") or {}
    fmt = lambda e: f"{e['ppl']:.2f}" if e else "-"  # noqa: E731
    return (f"finetuned {r['model']} on {r['data']} ({how}) -> {r['out']}: {r['steps']} steps, {r['tokens']:,} tokens "
            f"in {r['seconds']} s ({r['train_tokens_per_s']} tokens/s while training, {r['processes']} process(es))\n"
            f"held-out perplexity: before {fmt(before)}, after {fmt(after)}"
            + (f"\nloss plot: {r['plot']}" if r.get("plot") else ""))


def render_bleu(r: dict) -> str:
    """The BLEU / chrF table of `t2r eval --bleu`."""
    lines = [f"{r['model']} on {r['data']} {r['split']}: {r['sentences']} sentences, beam {r['beam']}",
             f"{'':14} {'BLEU':>7} {'chrF':>7} {'seconds':>8}"]
    for name, label in (("teacher", "original"), ("student", "converted")):
        if name in r:
            m = r[name]
            lines.append(f"{label:14} {m['bleu']:7.2f} {m['chrf']:7.2f} {m['seconds']:8.1f}")
    return "\n".join(lines)


def render_pipeline(r: dict) -> str:
    from ..stages.pipeline import report_markdown  # here: it imports torch

    return report_markdown(r) + f"\n(report: {r['out']}/report.md)"


EVAL_LABELS = {"teacher": "original", "student": "converted"}


def render_eval(r: dict) -> str:
    """The table `t2r eval` prints."""
    if r.get("bleu_eval"):
        return render_bleu(r)
    if r.get("positions"):
        return _render_positions(r)
    rows = {EVAL_LABELS[n]: r[n] for n in ("teacher", "student") if n in r}
    rows.update({f"{part} off": a for part, a in r.get("ablations", {}).items()})
    where = (f"{r['text']} ({r['documents']} documents), lm-eval rolling windows of {r['context']} tokens"
             if "text" in r else
             f"{r['data']} {r['split']}: {r['blocks']} blocks of {r['block_size']}, windows of {r['context']} tokens")
    lines = [f"{r['model']} on {where}"]
    if "text" in r:
        lines.append(f"{'':14} {'word ppl':>10} {'byte ppl':>9} {'bits/byte':>9} {'token ppl':>10} {'tokens':>8}")
        for label, m in rows.items():
            lines.append(f"{label:14} {m['word_perplexity']:10.3f} {m['byte_perplexity']:9.4f} "
                         f"{m['bits_per_byte']:9.4f} {m['ppl']:10.3f} {m['tokens']:8d}")
    else:
        lines.append(f"{'':14} {'perplexity':>10} {'nll':>7} {'bits/byte':>9} {'tokens':>8}")
        for label, m in rows.items():
            bpb = f"{m['bits_per_byte']:9.4f}" if "bits_per_byte" in m else f"{'-':>9}"
            lines.append(f"{label:14} {m['ppl']:10.3f} {m['nll']:7.4f} {bpb} {m['tokens']:8d}")
    if "ratio" in r:
        lines.append(f"converted / original perplexity: {r['ratio']:.3f}")
    lines.append(f"[{r['seconds']} s]")
    return "\n".join(lines)


def _render_positions(r: dict) -> str:
    """Loss by position: perplexity per position bucket, one row per model (and per ablation)."""
    rows = {EVAL_LABELS[n]: r[n] for n in ("teacher", "student") if n in r}
    rows.update({f"{part} off": a for part, a in r.get("ablations", {}).items()})
    buckets = max((m["buckets"] for m in rows.values()), key=len)
    names = [f"{_tokens(b['start'])}-{_tokens(min(b['end'], r['context']))}" for b in buckets]
    lines = [f"{r['model']} on {r['data']} {r['split']}: {r['documents']} documents of {r['context']} tokens, "
             "perplexity by position", f"{'':14} " + " ".join(f"{n:>9}" for n in names)]
    for label, m in rows.items():
        cells = [f"{b['ppl']:9.2f}" for b in m["buckets"]] + [f"{'-':>9}"] * (len(names) - len(m["buckets"]))
        note = f"  (stopped at {m['stopped_at']} tokens: KV cache cap)" if m.get("stopped_at") else ""
        lines.append(f"{label:14} " + " ".join(cells) + note)
    trained = r.get("teacher", r.get("student", {})).get("trained_context")
    if trained and trained < r["context"]:
        lines.append(f"positions past {trained} are beyond the model's trained context")
    if r.get("plot"):
        lines.append(f"plot: {r['plot']}")
    lines.append(f"[{r['seconds']} s]")
    return "\n".join(lines)


def _tokens(n: int) -> str:
    return f"{n // 1024}k" if n >= 1024 and n % 1024 == 0 else str(n)


def render_lm_eval(r: dict) -> str:
    """The lines `t2r lm-eval` prints."""
    lines = [f"lm-eval {r['lm_eval_version']}: {r['model']} ({r['which']} model), max_length {r['context']}"
             + (f", text {r['text']}" if r.get("text") else "")]
    for task, metrics in r["results"].items():
        lines += [f"{task}:"] + [f"  {name:16} {value:.6g}" for name, value in sorted(metrics.items())]
    lines.append(f"[{r['seconds']} s]")
    return "\n".join(lines)


def render(command: str, r: dict) -> str:
    """Human-readable text for a command's result."""
    if command in RENDERERS:
        return RENDERERS[command](r)
    if command == "convert":
        rec = r["recipe"]
        return (f"converted {r['source']} -> {r['out']}: {r['linear_layers']} linear attention layers "
                f"({rec['feature_map']}, feature_dim={rec['feature_dim']}, window={rec['window']}, "
                f"softmax kept: {rec['keep_softmax_layers'] or 'none'}), +{r['parameters_added']:,} parameters, "
                f"{r['seconds']} s" + ("; with its code: transformers loads it with trust_remote_code=True, without "
                                       "t2r" if r.get("remote_code") else ""))
    if command == "translate":
        return f"{r['translation']}\n\n[beam {r['beam']}, {r['seconds']} s]"
    if command == "generate":
        shown = "" if r.get("streamed") else (r["text"] if r.get("chat") else f"{r['prompt']}{r['text']}") + "\n"
        return (f"{shown}\n[{r['new_tokens']} tokens in {r['seconds']} s, "
                f"{r['tokens_per_s']} tokens/s, state {fmt_bytes(r['state_bytes'])}]")
    if command == "chat":
        return render_chat(r)
    if command == "verify":
        lines = [f"{k}: {v:.3g}" for k, v in r.items() if "max_rel_err" in k]
        factor = r.get("rounding_factor", 0)
        rounding = (f" = {factor:g} x the {r['dtype']} rounding error {r['dtype_rounding_error']:.3g} of this model"
                    if factor and factor * r["dtype_rounding_error"] >= r["tolerance"] else "")
        bounds = f"tolerance {r['tolerance']:.3g}{rounding} in {r['dtype']}" + (
            f", {r['exact_tolerance']} in float64" if "exact_tolerance" in r else "")
        if r.get("dtype_too_coarse"):
            lines.append(f"note: in {r['dtype']} this model's logits differ from its float32 logits by "
                         f"{r['dtype_rounding_error']:.3g} (relative): {r['dtype']} is too coarse for it; use float32")
        return "\n".join(lines + [f"{'OK' if r['ok'] else 'MISMATCH'} ({bounds})"])
    if command == "data" and "train_pairs" in r:
        return (f"{r['source']} -> {r['out']}: {r['train_pairs']:,} train and {r['heldout_pairs']:,} held-out pairs "
                f"(skipped: {r['skipped_empty']} with an empty side, {r['format_only']} format-only, "
                f"{r['duplicates']} duplicates, {r['removed_overlapping_heldout']} overlapping held-out)")
    if command == "data":
        return (f"{r['source']} -> {r['out']}: {r['train_tokens']:,} train tokens, {r['heldout_tokens']:,} held-out "
                f"tokens in blocks of {r['block_size']}")
    return str(r)


RENDERERS = {"eval": render_eval, "lm-eval": render_lm_eval, "pipeline": render_pipeline, "demo": render_pipeline,
             "bench": render_bench, "distill": render_distill, "finetune": render_finetune, "recall": render_recall}
