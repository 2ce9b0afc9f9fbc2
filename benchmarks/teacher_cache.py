"""Stage 2 with a live teacher against a cached one (`--kd-top-k`): tokens per hour of the training steps and the
final held-out perplexity of each, on the real default model.

The student is the embedded SmolLM2-135M-Instruct (GGUF) converted by `t2r convert` with its defaults (made once in
OUT/converted; or give --student DIR), loaded the way `t2r finetune` loads it. In one process, so that both see the
same machine load: (1) stage 2 with the live teacher (one teacher forward per step), (2) the cache filled for exactly
the blocks the run reads (its own timing: one teacher forward per block), (3) stage 2 again, reading the cache. Both
runs: LoRA, KD, the same seed, data order and budget.

    OMP_NUM_THREADS=1 python benchmarks/teacher_cache.py --tokens 16k --json runs/bench-teacher-cache/result.json

Prints a table; `--json` writes the figures. Tokens/hour counts the optimizer steps only (the trainer's
`train_tokens_per_s`), the wall columns count everything a run does (loading, the teacher's fingerprint, the held-out
evaluations before and after, the export).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

from t2r.cli.models import convert_command, load_any
from t2r.io import write_json
from t2r.stages.distill import load_training_data
from t2r.lora import apply_lora
from t2r.rng import seeded
from t2r.stages.finetune import Finetuning, LanguageModeling, default_teacher, finetune_model
from t2r.stages.teacher_cache import TeacherCache
from t2r.train import BlockStream, FinetuneSettings


def student_dir(args) -> str:
    if args.student:
        return args.student
    path = Path(args.out) / "converted"
    if not (path / "config.json").is_file():
        convert_command(out=str(path), overwrite=True)
    return str(path)


def settings(args, top_k: int, cache: Path | None = None) -> FinetuneSettings:
    return FinetuneSettings(tokens=args.tokens, lora=args.lora, kd=args.kd, kd_top_k=top_k, eval_every=0,
                            eval_blocks=args.eval_blocks, checkpoint_every=0, seed=args.seed,
                            teacher_cache=str(cache) if cache else None)


def finetune(name: str, model: str, blocks, out: Path, options: FinetuneSettings) -> dict:
    student, tokenizer = load_any(model)
    started = time.perf_counter()
    summary = finetune_model(student, blocks, out / name, options.train_config(progress=False), tokenizer=tokenizer,
                             method=Finetuning.of(options), overwrite=True)
    wall = time.perf_counter() - started
    records = [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines()]
    per_step = [r["tokens_per_s"] for r in records if r["kind"] == "train"]
    return {"run": name, "tokens": summary["tokens"], "steps": summary["steps"],
            "tokens_per_hour": round(summary["train_tokens_per_s"] * 3600),
            "tokens_per_hour_median_step": round(statistics.median(per_step) * 3600),
            "step_seconds": round(summary["tokens_per_step"] / summary["train_tokens_per_s"], 3),
            "wall_seconds": round(wall, 1), "ppl_before": round(summary["eval_before"]["ppl"], 3),
            "ppl_after": round(summary["eval_after"]["ppl"], 4), "teacher_cache": summary.get("teacher_cache")}


def fill(model: str, blocks, cache: Path, options: FinetuneSettings) -> dict:
    """The cache filled for the blocks the run reads (its data order), timed in two parts: the teacher's fingerprint
    (hashing its weights: the cache key), then one teacher forward, its top-k and a shard write per block."""
    student, _ = load_any(model)
    teacher = default_teacher(student)
    config = options.train_config(progress=False)
    steps = config.total_steps(config.batch_size * config.grad_accum * blocks.train.shape[1])
    read = BlockStream(len(blocks.train), config.seed).indices(0, steps * config.batch_size * config.grad_accum)
    started = time.perf_counter()
    teacher_cache = TeacherCache(teacher, cache, options.kd_top_k)
    keyed = time.perf_counter()
    report = teacher_cache.fill(blocks.train[read], progress="teacher cache")
    seconds = time.perf_counter() - keyed
    return {"run": f"fill k={options.kd_top_k}", **report, "fingerprint_seconds": round(keyed - started, 1),
            "seconds": round(seconds, 1), "seconds_per_block": round(seconds / max(1, report["blocks_computed"]), 3),
            "shard_bytes": sum(p.stat().st_size for p in Path(report["dir"]).glob("*.safetensors"))}


def interleaved(model: str, blocks, cache: Path, options: FinetuneSettings, rounds: int) -> dict:
    """Seconds per optimizer step of each variant, measured alternately on one LoRA student (live, cached, cached,
    live, ...) so that the machine's load falls on both alike: forward, backward, clipping and AdamW, as in a
    trainer step, on the blocks the run reads (all cached). Medians."""
    student, _ = load_any(model)
    teacher = default_teacher(student)
    with seeded(options.seed):
        student = apply_lora(student, options.lora, options.lora_modules)
    variants = {"live": LanguageModeling(student, teacher=teacher, kd=options.kd),
                "cached": LanguageModeling(student, kd=options.kd,
                                           cache=TeacherCache(teacher, cache, options.kd_top_k))}
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=options.lr)
    read = BlockStream(len(blocks.train), options.seed).indices(0, 2 * rounds)
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    for i in range(2 * rounds):
        name = ("live", "cached", "cached", "live")[i % 4]
        started = time.perf_counter()
        variants[name].train()(blocks.train[read[i]][None])["loss"].backward()
        torch.nn.utils.clip_grad_norm_(params, options.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        seconds[name].append(time.perf_counter() - started)
    return {name: round(statistics.median(values), 3) for name, values in seconds.items()}


def compare(live: dict, filled: dict, cached: dict, block_size: int) -> dict:
    blocks_per_step = live["tokens"] / live["steps"] / block_size
    return {"top_k": filled["top_k"], "speedup_steps": round(cached["tokens_per_hour"] / live["tokens_per_hour"], 3),
            "speedup_median_step": round(cached["tokens_per_hour_median_step"] / live["tokens_per_hour_median_step"],
                                         3),
            "speedup_wall": round(live["wall_seconds"] / cached["wall_seconds"], 3),
            "ppl_change": round(cached["ppl_after"] / live["ppl_after"] - 1, 5),
            "teacher_share_of_live_step": round(filled["seconds_per_block"] * blocks_per_step / live["step_seconds"],
                                                3)}


def report(result: dict) -> None:
    runs = [r for r in result["runs"] if not r["run"].startswith("fill")]
    print(f"{'run':12} {'tokens/hour':>12} {'(median step)':>14} {'s/step':>7} {'wall s':>7} {'ppl before':>11} "
          f"{'ppl after':>10}")
    for r in runs:
        print(f"{r['run']:12} {r['tokens_per_hour']:>12,} {r['tokens_per_hour_median_step']:>14,} "
              f"{r['step_seconds']:>7.2f} {r['wall_seconds']:>7.1f} {r['ppl_before']:>11.2f} {r['ppl_after']:>10.3f}")
    for r in (r for r in result["runs"] if r["run"].startswith("fill")):
        print(f"{r['run']}: {r['blocks_computed']} blocks in {r['seconds']} s ({r['seconds_per_block']} s per block) "
              f"after {r['fingerprint_seconds']} s of fingerprint; {r['shard_bytes'] / 2**20:.1f} MiB on disk")
    for c in result["comparisons"]:
        step = c.get("interleaved_step_seconds")
        alternate = (f"; steps timed alternately: {step['live']:.2f} s live, {step['cached']:.2f} s cached = "
                     f"{c['speedup_interleaved']:.2f}x" if step else "")
        print(f"k={c['top_k']}: cached / live tokens per hour {c['speedup_steps']:.2f}x (median step "
              f"{c['speedup_median_step']:.2f}x, wall {c['speedup_wall']:.2f}x){alternate}; final perplexity "
              f"{100 * c['ppl_change']:+.2f}%; the teacher's forward ~{100 * c['teacher_share_of_live_step']:.0f}% "
              "of a live step")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--student", help="converted model directory (default: `t2r convert` into OUT/converted)")
    parser.add_argument("--data", default="austen")
    parser.add_argument("--tokens", default="16k")
    parser.add_argument("--block-size", type=int, default=512)
    parser.add_argument("--lora", type=int, default=8)
    parser.add_argument("--kd", type=float, default=1.0)
    parser.add_argument("--top-k", default="64", help="comma-separated: one cached run per k, after the live one")
    parser.add_argument("--eval-blocks", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=8, help="steps of each variant in the interleaved timing "
                                                               "(0: none)")
    parser.add_argument("--out", default="runs/bench-teacher-cache")
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()
    out, cache = Path(args.out), Path(args.out) / ".teacher-cache"
    shutil.rmtree(cache, ignore_errors=True)  # the fill passes start from nothing
    model = student_dir(args)
    blocks = load_training_data(args.data, load_any(model)[1], args.block_size)
    live = finetune("live", model, blocks, out, settings(args, 0))
    runs, comparisons = [live], []
    for k in (int(x) for x in args.top_k.split(",")):
        filled = fill(model, blocks, cache, settings(args, k, cache))
        cached = finetune(f"cached-k{k}", model, blocks, out, settings(args, k, cache))
        runs += [filled, cached]
        comparisons.append(compare(live, filled, cached, args.block_size))
        if args.rounds:
            step = interleaved(model, blocks, cache, settings(args, k, cache), args.rounds)
            comparisons[-1].update(interleaved_step_seconds=step,
                                   speedup_interleaved=round(step["live"] / step["cached"], 3))
    result = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "args": vars(args),
              "machine": f"{platform.machine()}, {os.cpu_count()} CPUs visible",
              "torch_threads": torch.get_num_threads(), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
              "runs": runs, "comparisons": comparisons}
    report(result)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        write_json(args.json, result)


if __name__ == "__main__":
    main()
