"""`t2r pipeline`: convert -> attention transfer -> (automatic softmax layers) -> finetune -> evaluate -> export,
from one YAML recipe, with a markdown report. Each finished stage leaves its model in OUT/<stage>/; running the
same recipe again skips finished stages and resumes an interrupted one from its checkpoint. Held-out evaluations are
remembered on disk (`t2r.evaluate.cached_perplexity`, keyed by the weights and the tokens): recipes that share a model
(every recipe's original-model row) or a rerun evaluate it once.

A recipe (see src/t2r/recipes/*.yaml, usable by name: `t2r pipeline --config hedgehog-transfer`):

    name: hedgehog-window           # run name (OUT defaults to runs/<name>)
    model: null                     # GGUF file, HF directory or hub id (null: the embedded SmolLM2-135M-Instruct)
    init: pretrained                # or random: the same RNN from random weights (the paper's baseline)
    data: austen                    # training text (anything `t2r data` takes)
    block_size: 512
    convert: {feature_map: hedgehog, feature_dim: 64, window: 64, keep_softmax_layers: []}
    distill: {tokens: 100k, lr: 0.03}              # stage 1; omit to skip
    keep_softmax: auto:3            # after stage 1, the 3 layers with the highest transfer error go back to softmax
    teacher_finetune: {tokens: 150k, lora: 8}      # optional: the original finetuned on the same data (LM loss)
    finetune: {tokens: 100k, lora: 8, kd: 0.5}     # stage 2; omit to skip
    eval: {data: [austen, pydocs], context: 512, max_blocks: 16}
    generate: {prompt: "It is a truth universally acknowledged", max_new_tokens: 32}

`teacher_finetune` finetunes the original model on the recipe's data (it reads the same first tokens of the same
seeded block order as the other stages) into OUT/teacher-finetune. It is the reference the RNN is measured against
(the teacher finetuned on the same tokens: its perplexity is reported beside the stages), and stage 2's `kd` then
distils from it instead of from the unfinetuned original, so that KD pulls the RNN towards the adapted teacher.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..adapters import adapter_for, cache_bytes
from ..convert import convert, keep_softmax, reinitialize
from ..data import prepare_data
from ..decode import decode
from ..errors import T2RError
from ..evaluate import cached_perplexity, model_fingerprint
from ..generate import new_cache, prepare_tokenizer
from ..io import write_json, write_text
from ..persistence import load, save
from ..recipe import INITS
from ..sources import load_model
from ..train import TrainConfig, parse_tokens
from ..transfer import layer_errors
from ..units import fmt_bytes
from .distill import attention_transfer
from .finetune import finetune_model, frozen

log = logging.getLogger(__name__)

TRAIN_KEYS = {"tokens", "steps", "lr", "batch_size", "grad_accum", "warmup", "min_lr", "weight_decay",
              "max_grad_norm", "eval_every", "eval_blocks", "checkpoint_every", "seed"}
DEFAULT_PROMPT = "It is a truth universally acknowledged"


class RecipeFileError(T2RError):
    """A pipeline recipe that cannot be read or has invalid entries."""


@dataclass
class PipelineRecipe:
    name: str
    model: str | None = None
    init: str = "pretrained"
    data: str = "austen"
    block_size: int = 512
    convert: dict = field(default_factory=dict)
    distill: dict | None = None
    keep_softmax: str | list | None = None
    teacher_finetune: dict | None = None
    finetune: dict | None = None
    eval: dict = field(default_factory=lambda: {"data": ["austen"], "context": 512, "max_blocks": 16})
    generate: dict = field(default_factory=lambda: {"prompt": DEFAULT_PROMPT, "max_new_tokens": 32})

    @classmethod
    def from_file(cls, path: str | Path) -> "PipelineRecipe":
        """Read a YAML recipe: a file path, or the name of a recipe shipped with t2r (see `shipped_recipes()`)."""
        import yaml

        if not Path(path).exists() and str(path) in shipped_recipes():
            path = shipped_recipes()[str(path)]
        try:
            raw = yaml.safe_load(Path(path).read_text())
        except FileNotFoundError:
            raise RecipeFileError(f"recipe file {str(path)!r} does not exist; shipped recipes: "
                                  f"{', '.join(shipped_recipes())}") from None
        except yaml.YAMLError as err:
            raise RecipeFileError(f"recipe file {str(path)!r} is not valid YAML: {err}") from None
        if not isinstance(raw, dict):
            raise RecipeFileError(f"recipe file {str(path)!r} must be a mapping of settings")
        raw.setdefault("name", Path(path).stem)
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(raw) - known)
        if unknown:
            raise RecipeFileError(f"unknown recipe entries {unknown} in {str(path)!r}; known: {sorted(known)}")
        recipe = cls(**raw)
        if recipe.init not in INITS:
            raise RecipeFileError(f"init must be one of {', '.join(INITS)}, got {recipe.init!r} in {str(path)!r}")
        for stage in ("distill", "teacher_finetune", "finetune"):
            allowed = {"lora", "lora_modules"} if stage == "teacher_finetune" else {"lora", "lora_modules", "kd",
                                                                                    "attn_ce"}
            extra = set(getattr(recipe, stage) or {}) - TRAIN_KEYS - allowed
            if extra:
                raise RecipeFileError(f"unknown {stage} settings {sorted(extra)} in {str(path)!r}")
        return recipe


def shipped_recipes() -> dict[str, Path]:
    """The recipes that ship with t2r (src/t2r/recipes/*.yaml), by name."""
    return {p.stem: p for p in sorted((Path(__file__).parents[1] / "recipes").glob("*.yaml"))}


def parse_keep_softmax(spec, num_layers: int) -> tuple[str, int | list[int]]:
    """"auto:3" -> ("auto", 3); [0, 15] or "0,15" -> ("fixed", [0, 15])."""
    if spec is None or spec == "" or spec == []:
        return "fixed", []
    if isinstance(spec, str) and spec.startswith("auto:"):
        try:
            n = int(spec[5:])
        except ValueError:
            n = -1
        if not 0 <= n < num_layers:
            raise RecipeFileError(f"keep_softmax 'auto:N' needs 0 <= N < {num_layers} layers, got {spec!r}")
        return "auto", n
    items = spec.split(",") if isinstance(spec, str) else spec
    try:
        return "fixed", sorted({int(i) for i in items})
    except (TypeError, ValueError):
        raise RecipeFileError(f"keep_softmax takes 'auto:N' or layer indices like [0, 15]; got {spec!r}") from None


def worst_layers(errors: list[float], n: int) -> list[int]:
    """Indices of the `n` largest attention-transfer errors (ties: lower index first)."""
    return sorted(sorted(range(len(errors)), key=lambda i: (-errors[i], i))[:n])


def _train_config(settings: dict, default_lr: float):

    kw = {k: v for k, v in settings.items() if k in TRAIN_KEYS}
    kw.setdefault("lr", default_lr)
    if "steps" not in kw:
        kw["tokens"] = parse_tokens(kw.get("tokens", "100k"))
    return TrainConfig(**kw)


def _evaluate(model, tokenizer, recipe: PipelineRecipe) -> dict:

    cfg = recipe.eval
    sets = cfg.get("data", ["austen"])
    results = {}
    fingerprint = model_fingerprint(model)  # once for every held-out set
    for source in [sets] if isinstance(sets, str) else sets:
        heldout = prepare_data(source, tokenizer, block_size=recipe.block_size).heldout
        r = cached_perplexity(model, heldout, context=cfg.get("context", recipe.block_size),
                              max_blocks=cfg.get("max_blocks"), batch_size=cfg.get("batch_size", 2),
                              progress=f"eval {source}", fingerprint=fingerprint)
        results[source] = round(r["ppl"], 3)
    return results


def _done(stage_dir: Path) -> bool:
    return (stage_dir / "config.json").is_file() and (stage_dir / "train.json").is_file()


def _speed(model, tokenizer, recipe: PipelineRecipe) -> dict:
    """Generated text, decode ms/token (lean loop) and cache bytes after the prompt + new tokens."""

    cfg = recipe.generate
    prepare_tokenizer(tokenizer)
    enc = tokenizer(cfg.get("prompt", DEFAULT_PROMPT), return_tensors="pt")
    n = int(cfg.get("max_new_tokens", 32))
    cache = new_cache(model)
    with torch.inference_mode():
        start = time.perf_counter()
        tokens, cache = decode(model, enc["input_ids"], enc["attention_mask"], max_new_tokens=n, cache=cache,
                               eos_token_id=None)
        seconds = time.perf_counter() - start
    return {"text": tokenizer.decode(tokens[0], skip_special_tokens=True), "new_tokens": int(tokens.shape[1]),
            "ms_per_token": round(1000 * seconds / max(1, tokens.shape[1]), 2), "cache_bytes": cache_bytes(cache),
            "context": int(enc["input_ids"].shape[1] + tokens.shape[1])}


def run_pipeline(recipe: PipelineRecipe, out: str | Path) -> dict:
    """Run every stage of `recipe` into `out`; returns the results (also written to OUT/pipeline.json + report.md)."""

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    teacher, tokenizer, source = load_model(recipe.model)
    blocks = prepare_data(recipe.data, tokenizer, block_size=recipe.block_size)
    results = {"recipe": recipe.__dict__, "source": source.describe(), "stages": [], "out": str(out)}

    def record(stage: str, model, **extra) -> None:
        row = {"stage": stage, "ppl": _evaluate(model, tokenizer, recipe), **extra}
        log.info("%s: held-out perplexity %s", stage, row["ppl"])
        results["stages"].append(row)

    record("original", teacher)
    converted_dir = out / "converted"
    if (converted_dir / "config.json").is_file():
        student = load(converted_dir)
    else:
        base = copy.deepcopy(teacher)
        if recipe.init == "random":
            reinitialize(base, seed=int(recipe.convert.get("seed", 0)))
        student = convert(base, **recipe.convert)
        save(student, converted_dir, tokenizer)
    record("after swap", student, dir=str(converted_dir))
    final_dir = converted_dir

    if recipe.distill is not None:
        stage_dir = out / "distill"
        if not _done(stage_dir):
            config = _train_config(recipe.distill, default_lr=3e-2)
            attention_transfer(student, blocks, stage_dir, config, tokenizer=tokenizer,
                               attn_ce=float(recipe.distill.get("attn_ce", 0.0)),
                               resume=(stage_dir / "checkpoint").is_dir())
        student, final_dir = load(stage_dir), stage_dir
        record("after stage 1 (attention transfer)", student, dir=str(stage_dir))

    how, layers = parse_keep_softmax(recipe.keep_softmax, len(adapter_for(student).decoder_layers(student)))
    if how == "auto" and layers:
        errors = layer_errors(student, blocks.heldout[:4])
        layers = worst_layers(errors, layers)
        results["layer_errors"] = [round(e, 5) for e in errors]
    if layers:
        stage_dir = out / "softmax-layers"
        if not (stage_dir / "config.json").is_file():
            keep_softmax(student, layers)
            save(student, stage_dir, tokenizer)
        student, final_dir = load(stage_dir), stage_dir
        record(f"with softmax layers {layers}", student, dir=str(stage_dir), softmax_layers=layers)

    kd_teacher = teacher
    if recipe.teacher_finetune is not None:
        kd_teacher = _finetuned_teacher(recipe, teacher, tokenizer, blocks, out / "teacher-finetune")
        results["reference"] = {"stage": "original finetuned (reference)", "dir": str(out / "teacher-finetune"),
                                "ppl": _evaluate(kd_teacher, tokenizer, recipe)}
        log.info("original finetuned: held-out perplexity %s", results["reference"]["ppl"])

    if recipe.finetune is not None:
        stage_dir = out / "finetune"
        if not _done(stage_dir):
            _finetune_stage(student, recipe.finetune, blocks, stage_dir, tokenizer, teacher=kd_teacher)
        student, final_dir = load(stage_dir), stage_dir
        record("after stage 2 (finetuning)", student, dir=str(stage_dir))

    results["final_model"] = str(final_dir)
    results["generation"] = {"teacher": _speed(teacher, tokenizer, recipe), "student": _speed(student, tokenizer, recipe)}
    write_json(out / "pipeline.json", results, default=str)
    write_text(out / "report.md", report_markdown(results))
    return results


def _finetune_stage(model, settings: dict, blocks, stage_dir: Path, tokenizer, teacher=None) -> None:
    """Finetune `model` by a recipe's finetune settings into `stage_dir` (resuming its checkpoint if there is one)."""

    lora = int(settings.get("lora", 0))
    config = _train_config(settings, default_lr=2e-4 if lora else 3e-5)
    finetune_model(model, blocks, stage_dir, config, tokenizer=tokenizer, lora=lora,
                   lora_modules=settings.get("lora_modules", ""), kd=float(settings.get("kd", 0.0)),
                   teacher=teacher, resume=(stage_dir / "checkpoint").is_dir())


def _finetuned_teacher(recipe: PipelineRecipe, teacher, tokenizer, blocks, stage_dir: Path):
    """The original model finetuned by `recipe.teacher_finetune` (LM loss only) in `stage_dir`, loaded, frozen."""

    if not _done(stage_dir):
        _finetune_stage(copy.deepcopy(teacher), recipe.teacher_finetune, blocks, stage_dir, tokenizer)
    return frozen(load_model(str(stage_dir))[0])


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
    return "\n".join(lines) + "\n"
