"""`t2r pipeline`: convert -> attention transfer -> (automatic softmax layers) -> finetune -> evaluate -> export,
from one recipe (`t2r.stages.recipes`), with a markdown report. Each stage leaves its model in OUT/<stage>/ with the
settings that made it (`t2r.stages.records`): running the recipe again reuses each finished stage, and resumes an
interrupted one from its checkpoint, when those settings equal the recipe's, and otherwise stops, naming the setting
that differs (`--redo STAGE` redoes a stage and the stages built on it). Held-out evaluations are remembered on disk
(`t2r.evaluate.cached_perplexity`, keyed by the weights and the tokens): recipes that share a model (every recipe's
original-model row) or a rerun evaluate it once; the training stages leave their own evaluations before and after
training to these. The final model is saved whole, a stage before it as its changes over the stage it was built on
(`t2r.stages.delta`), the converted stage as its changes over the source model where that can be rebuilt bit for bit
(`t2r.stages.source_root`: a local GGUF file or HF directory, pretrained weights); the run's disk use is reported
(`t2r.stages.disk`).

`teacher_finetune` finetunes the original model on the recipe's data (it reads the same first tokens of the same
seeded block order as the other stages) into OUT/teacher-finetune. It is the reference the RNN is measured against
(the teacher finetuned on the same tokens: its perplexity is reported beside the stages), and stage 2's `kd` then
distils from it instead of from the unfinetuned original, so that KD pulls the RNN towards the adapted teacher.
"""

from __future__ import annotations

import copy
import logging
import shutil
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from ..adapters import adapter_for, cache_bytes
from ..convert import convert, keep_softmax, reinitialize
from ..data import prepare_data
from ..decode import decode
from ..evaluate import cached_perplexity, model_fingerprint
from ..generate import new_cache, prepare_tokenizer
from ..io import write_json, write_text
from ..persistence import load, save
from ..remote_code import write_remote_code
from ..sources import load_model
from ..transfer import layer_errors
from ..units import fmt_bytes
from .distill import attention_transfer
from .finetune import Finetuning, finetune_model, frozen
from .recipes import DEFAULT_PROMPT, PipelineRecipe, parse_keep_softmax
from .delta import is_delta_dir, materialise_in_place, rewrite_as_delta
from .disk import disk_markdown, disk_summary, disk_use, final_stage, without_end_evaluations
from .records import active_stages, plan_stages, stage_settings, write_record
from .source_root import loaded_source, rewrite_over_source, source_reference

log = logging.getLogger(__name__)


def worst_layers(errors: list[float], n: int) -> list[int]:
    """Indices of the `n` largest attention-transfer errors (ties: lower index first)."""
    return sorted(sorted(range(len(errors)), key=lambda i: (-errors[i], i))[:n])


def _evaluate(model, tokenizer, recipe: PipelineRecipe, label: str) -> dict:
    cfg, results = recipe.eval, {}
    fingerprint = model_fingerprint(model)  # once for every held-out set
    for source in cfg.data:
        heldout = prepare_data(source, tokenizer, block_size=recipe.block_size).heldout
        r = cached_perplexity(model, heldout, context=cfg.context or recipe.block_size, max_blocks=cfg.max_blocks,
                              batch_size=cfg.batch_size, progress=f"held-out evaluation ({label}, {source})",
                              fingerprint=fingerprint)
        results[source] = round(r["ppl"], 3)
    return results


def _speed(model, tokenizer, recipe: PipelineRecipe) -> dict:
    """Generated text, decode ms/token (lean loop, greedy) and cache bytes after the prompt + new tokens."""
    prepare_tokenizer(tokenizer)
    enc = tokenizer(recipe.generate.prompt, return_tensors="pt")
    cache = new_cache(model)
    with torch.inference_mode():
        start = time.perf_counter()
        tokens, cache = decode(model, enc["input_ids"], enc["attention_mask"],
                               max_new_tokens=recipe.generate.max_new_tokens, cache=cache, eos_token_id=None)
        seconds = time.perf_counter() - start
    return {"text": tokenizer.decode(tokens[0], skip_special_tokens=True), "new_tokens": int(tokens.shape[1]),
            "ms_per_token": round(1000 * seconds / max(1, tokens.shape[1]), 2), "cache_bytes": cache_bytes(cache),
            "context": int(enc["input_ids"].shape[1] + tokens.shape[1])}


def with_code(stage_dir: Path, settings) -> Path:
    """A training stage's `remote_code: true` writes its model's code beside it (`t2r.remote_code`), where the stage
    is saved whole (the code is no use beside a delta, which only t2r reads)."""
    if settings.remote_code and is_delta_dir(stage_dir):
        log.warning("%s is saved as its changes over its parent stage: its code is not written (the final model "
                    "gets it with --remote-code)", stage_dir)
    elif settings.remote_code:
        write_remote_code(stage_dir)
    return stage_dir


class _Run:
    """One run of a recipe into OUT: the original model, its tokenizer and the training blocks, the stage plan,
    and the results gathered so far."""

    def __init__(self, recipe: PipelineRecipe, out: Path, plan: dict[str, str]) -> None:
        self.recipe, self.out, self.plan = recipe, out, plan
        self.teacher, self.tokenizer, source = load_model(recipe.model)
        self.blocks = prepare_data(recipe.data, self.tokenizer, block_size=recipe.block_size)
        self.results = {"recipe": recipe.model_dump(mode="json"), "source": source.describe(), "stages": [],
                        "out": str(out)}

    def record(self, stage: str, model, **extra) -> None:
        row = {"stage": stage, "ppl": _evaluate(model, self.tokenizer, self.recipe, stage), **extra}
        log.info("%s: held-out perplexity %s", stage, row["ppl"])
        self.results["stages"].append(row)

    def stage(self, name: str, build: Callable[[Path, dict], None], parent: Path | None = None,
              over_source: bool = False) -> Path:
        """OUT/<name>, reused as planned, or (re)built by `build(stage_dir, record)` (a training stage records
        `record` in its checkpoints and resumes the interrupted run there), saved as its changes over `parent` (or,
        `over_source`, over the source model where it can be rebuilt) unless it is the recipe's final model
        (`t2r.stages.delta`), and then marked with its settings."""
        stage_dir, action = self.out / name, self.plan[name]
        if action == "reuse":
            log.info("%s: reusing %s (made with the recipe's settings)", name, stage_dir)
            return stage_dir
        if action == "redo":
            shutil.rmtree(stage_dir, ignore_errors=True)
        log.info("%s: %s %s", name, "resuming" if action == "resume" else "running", stage_dir)
        settings = stage_settings(self.recipe, name)
        build(stage_dir, {"pipeline": settings})
        write_record(stage_dir, name, settings)  # first: a crash while it shrinks leaves a whole stage that loads
        if name == final_stage(self.recipe) or is_delta_dir(stage_dir):
            return stage_dir
        if parent is not None:
            rewrite_as_delta(stage_dir, parent)
        elif over_source and (ref := source_reference(self.recipe.model)) is not None:  # None: a hub id, kept whole
            rewrite_over_source(stage_dir, ref, self.teacher.state_dict())
        return stage_dir

    def converted(self):
        def build(stage_dir: Path, record: dict) -> None:
            base, options = copy.deepcopy(self.teacher), self.recipe.convert
            if self.recipe.init == "random":
                reinitialize(base, seed=options.seed)
            converted = convert(base, options.recipe(), seed=options.seed, convert_layers=options.convert_layers)
            save(converted, stage_dir, self.tokenizer)

        # with init: random the base weights are random draws, not the source's: a delta would hold them all
        return self.stage("converted", build, over_source=self.recipe.init == "pretrained")

    def distilled(self, student, parent: Path):
        settings = self.recipe.distill
        return with_code(self.stage("distill", lambda stage_dir, record: attention_transfer(
            student, self.blocks, stage_dir, without_end_evaluations(settings.train_config()),
            tokenizer=self.tokenizer, attn_ce=settings.attn_ce, settings=record, resume=True), parent), settings)

    def softmax_layers(self, student, parent: Path) -> tuple[Path | None, list[int]]:
        """OUT/softmax-layers and its softmax layers (auto: the worst after stage 1), or (None, []) if none."""
        how, layers = parse_keep_softmax(self.recipe.keep_softmax, len(adapter_for(student).decoder_layers(student)))
        if how == "auto" and layers:
            errors = layer_errors(student, self.blocks.heldout[:4])
            layers = worst_layers(errors, layers)
            self.results["layer_errors"] = [round(e, 5) for e in errors]
        if not layers:
            return None, []

        def build(stage_dir: Path, record: dict) -> None:
            keep_softmax(student, layers)
            save(student, stage_dir, self.tokenizer)

        return self.stage("softmax-layers", build, parent), layers

    def finetuned(self, model, name: str, settings, teacher=None, parent: Path | None = None) -> Path:
        """`model` finetuned by `settings` (stage 2's, or the reference's) into OUT/<name>, saved as its changes over
        `parent` (None: whole)."""
        return with_code(self.stage(name, lambda stage_dir, record: finetune_model(
            model, self.blocks, stage_dir, without_end_evaluations(settings.train_config()),
            tokenizer=self.tokenizer, method=Finetuning.of(settings, teacher), settings=record, resume=True),
            parent), settings)

    def reference(self):
        """The KD teacher of stage 2: the original finetuned on the recipe's data when the recipe asks for it (also
        reported as the reference row), else the original."""
        if self.recipe.teacher_finetune is None:
            return self.teacher
        stage_dir = self.finetuned(copy.deepcopy(self.teacher), "teacher-finetune", self.recipe.teacher_finetune)
        finetuned = frozen(load_model(str(stage_dir))[0])
        self.results["reference"] = {"stage": "original finetuned (reference)", "dir": str(stage_dir),
                                     "ppl": _evaluate(finetuned, self.tokenizer, self.recipe, "original finetuned")}
        log.info("original finetuned: held-out perplexity %s", self.results["reference"]["ppl"])
        return finetuned


def run_pipeline(recipe: PipelineRecipe, out: str | Path, *, redo: Iterable[str] = ()) -> dict:
    """Run every stage of `recipe` into `out` (redoing the stages in `redo` and those built on them); returns the
    results (also written to OUT/pipeline.json + report.md)."""
    out = Path(out)
    plan = plan_stages(recipe, out, redo)  # before minutes of loading: a stage made otherwise stops the run here
    out.mkdir(parents=True, exist_ok=True)
    run = _Run(recipe, out, plan)
    with loaded_source(recipe.model, run.teacher):  # a stage over the source reads it from memory, not the file
        run.record("original", run.teacher)
        final_dir = run.converted()
        student = load(final_dir)
        run.record("after swap", student, dir=str(final_dir))
        if recipe.distill is not None:
            final_dir = run.distilled(student, final_dir)
            student = load(final_dir)
            run.record("after stage 1 (attention transfer)", student, dir=str(final_dir))
        stage_dir, layers = run.softmax_layers(student, final_dir)
        if stage_dir is not None:
            final_dir, student = stage_dir, load(stage_dir)
            run.record(f"with softmax layers {layers}", student, dir=str(stage_dir), softmax_layers=layers)
        kd_teacher = run.reference()
        if recipe.finetune is not None:
            final_dir = run.finetuned(student, "finetune", recipe.finetune, teacher=kd_teacher, parent=final_dir)
            student = load(final_dir)
            run.record("after stage 2 (finetuning)", student, dir=str(final_dir))
        results = run.results
        results["final_model"] = str(final_dir)
        if is_delta_dir(final_dir):  # the final model is standalone (saved as changes when a later stage was planned)
            materialise_in_place(final_dir)
        results["generation"] = {"teacher": _speed(run.teacher, run.tokenizer, recipe),
                                 "student": _speed(student, run.tokenizer, recipe)}
        results["disk"] = disk_use(out, active_stages(recipe))
        log.info("%s", disk_summary(results["disk"]))
        write_json(out / "pipeline.json", results, default=str)
        write_text(out / "report.md", report_markdown(results))
        return results


def report_markdown(results: dict) -> str:
    """A short markdown report: perplexity per stage and held-out set, generations, speed and cache sizes."""
    sets = list(results["stages"][0]["ppl"])
    lines = [f"# t2r pipeline: {results['recipe']['name']}", "",
             f"Source model: `{results['source']}`; training data: `{results['recipe']['data']}`; "
             f"final model: `{results['final_model']}` (loads with `t2r.load` or, after `import t2r`, "
             "`AutoModelForCausalLM.from_pretrained`).", "",
             "## Held-out perplexity", "", "| stage | " + " | ".join(sets) + " |",
             "|---|" + "---|" * len(sets)]
    for row in results["stages"]:
        lines.append(f"| {row['stage']} | " + " | ".join(f"{row['ppl'][s]:.2f}" for s in sets) + " |")
    if "reference" in results:
        ref, final = results["reference"]["ppl"], results["stages"][-1]["ppl"]
        lines.append(f"| *{results['reference']['stage']}* | " + " | ".join(f"{ref[s]:.2f}" for s in sets) + " |")
        lines += ["", "The RNN against the original finetuned on the same data: "
                  + ", ".join(f"{s} {final[s] / ref[s]:.3f}x" for s in sets) + "."]
    if "layer_errors" in results:
        lines += ["", "Attention-transfer error per layer (the largest went back to softmax): "
                  + ", ".join(f"{i}: {e:.3g}" for i, e in enumerate(results["layer_errors"]))]
    curves = [stage for stage in ("teacher-finetune", "distill", "finetune")
              if (Path(results.get("out", "")) / stage / "loss.png").is_file()]
    if curves:  # written by each training stage (t2r.train.plot), with matplotlib
        lines += ["", "## Training curves", ""] + [f"![{stage}]({stage}/loss.png)" for stage in curves]
    gen = results["generation"]
    lines += ["", "## Generation", "", f"Prompt: {results['recipe']['generate'].get('prompt', DEFAULT_PROMPT)!r}", ""]
    for who in ("teacher", "student"):
        g = gen[who]
        lines.append(f"- **{who}**: {g['text']!r}")
    lines += ["", "| model | decode ms/token | tokens/s | cache after " + str(gen["teacher"]["context"]) + " tokens |",
              "|---|---|---|---|"]
    for who in ("teacher", "student"):
        g = gen[who]
        lines.append(f"| {who} | {g['ms_per_token']} | {1000 / max(g['ms_per_token'], 1e-9):.1f} | "
                     f"{fmt_bytes(g['cache_bytes'])} |")
    per_token = gen["teacher"]["cache_bytes"] / max(1, gen["teacher"]["context"])
    lines += ["", f"The teacher's KV cache grows by {fmt_bytes(int(per_token))} per token "
              f"({fmt_bytes(int(per_token * 32768))} at 32,768 tokens); the student's linear layers keep a fixed "
              "state whatever the length (a window adds a fixed number of tokens, a softmax layer still grows)."]
    if "disk" in results:
        lines += disk_markdown(results["disk"])
    return "\n".join(lines) + "\n"
