"""The command-line commands as plain typed functions (see `t2r.cli`). Each returns a JSON-able dict; `render`
turns it into the human-readable text the CLI prints."""

from __future__ import annotations

import logging
import time

from .bench import bench, render_bench
from .distill import distill, render_distill
from .errors import T2RError
from .evaluate import eval, render_eval  # noqa: A004  (the command is `t2r eval`)
from .finetune import finetune, render_finetune
from .lm_eval_bridge import lm_eval, render_lm_eval
from .pipeline import pipeline, render_pipeline
from .recipe import INITS
from .units import fmt_bytes

log = logging.getLogger("t2r")

DEMO_PROMPT = "It is a truth universally acknowledged"


def _layers(spec: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in spec.replace(" ", "").split(",") if x)
    except ValueError:
        raise T2RError(f"--keep-softmax-layers takes comma-separated layer indices like 0,15; got {spec!r}") from None


def convert(model: str | None = None, *, out: str = "runs/rnn", feature_map: str = "hedgehog",
            feature_dim: int | None = None, window: int = 0, keep_softmax_layers: str = "",
            tie_qk: bool | None = None, chunk_size: int = 64, seed: int = 0, init: str = "pretrained",
            overwrite: bool = False, json: bool = False) -> dict:
    """Convert a pretrained causal LM's softmax attention to linear attention and save it.

    Args:
        model: GGUF file, HF model directory or hub id; default: the embedded SmolLM2-135M-Instruct.
        out: directory to write the converted model to (safetensors + JSON, written atomically).
        feature_map: feature map name: elu, hedgehog, performer, relu, rfa, t2r, taylor.
        feature_dim: feature size of the map (default: the map's own, e.g. 64 for hedgehog, head_dim for elu).
        window: sliding softmax window of this many recent tokens beside the linear part (0: pure linear).
        keep_softmax_layers: comma-separated layer indices that keep softmax attention, e.g. 0,15.
        tie_qk: share one feature map between queries and keys (default: the map's own choice).
        chunk_size: chunk length of the chunked form used in training and prefill.
        seed: seed for the new feature-map weights (and for --init random).
        init: pretrained, or random: throw the pretrained weights away first (the same RNN from random initialisation, a baseline).
        overwrite: replace --out if it already holds a t2r model.
        json: print the result as JSON.
    """
    from .convert import convert as run_convert, count_linear_layers, reinitialize
    from .persistence import save
    from .sources import load_model

    if init not in INITS:
        raise T2RError(f"--init is {' or '.join(INITS)}, got {init!r}")
    start = time.perf_counter()
    hf_model, tokenizer, source = load_model(model)
    if init == "random":
        reinitialize(hf_model, seed=seed)
    log.info("converting %s: %s, feature_dim=%s, window=%d", source.describe(), feature_map, feature_dim, window)
    converted = run_convert(hf_model, feature_map=feature_map, feature_dim=feature_dim, window=window,
                            keep_softmax_layers=_layers(keep_softmax_layers), tie_qk=tie_qk, chunk_size=chunk_size,
                            seed=seed)
    log.info("saving to %s", out)
    save(converted, out, tokenizer, overwrite=overwrite)
    return {"source": source.describe(), "out": out, "init": init, "recipe": converted.config.t2r,
            "linear_layers": count_linear_layers(converted),
            "parameters_added": sum(p.numel() for n, p in converted.named_parameters()
                                    if ".feature_map." in n or n.endswith("window_logit")),
            "seconds": round(time.perf_counter() - start, 2)}


def _load_converted(path: str):
    from .persistence import load, load_tokenizer

    log.info("loading %s", path)
    model = load(path)
    tokenizer = load_tokenizer(path)
    return model, tokenizer


def generate(model: str, *, prompt: str = DEMO_PROMPT, max_new_tokens: int = 64, sample: bool = False,
             temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, seed: int = 0, json: bool = False) -> dict:
    """Generate text with a converted model: chunked prefill, then one recurrent step per token.

    Args:
        model: directory of a converted model (from `t2r convert`).
        prompt: text to continue.
        max_new_tokens: number of tokens to generate.
        sample: sample instead of greedy decoding.
        temperature: sampling temperature (with --sample).
        top_p: nucleus sampling mass (with --sample).
        top_k: keep only the k most likely tokens (with --sample; 0 = off).
        seed: random seed for sampling.
        json: print the result as JSON.
    """
    from .generate import generate as run_generate

    if max_new_tokens <= 0:
        raise T2RError(f"--max-new-tokens must be positive, got {max_new_tokens}")
    hf_model, tokenizer = _load_converted(model)
    if tokenizer is None:
        raise T2RError(f"{model!r} has no tokenizer files: convert it again with `t2r convert` (it saves one)")
    result = run_generate(hf_model, tokenizer, prompt, max_new_tokens=max_new_tokens, do_sample=sample,
                          temperature=temperature, top_p=top_p, top_k=top_k, seed=seed)
    return {"prompt": prompt, "text": result.texts[0], "new_tokens": result.new_tokens,
            "seconds": round(result.seconds, 3), "tokens_per_s": round(result.tokens_per_s, 2),
            "state_bytes": result.state_bytes}


def verify(model: str, *, tokens: int = 100, prefill: int = 67, json: bool = False) -> dict:
    """Check that the parallel, chunked and recurrent forms give the same logits (exit code 1 if not).

    Args:
        model: directory of a converted model.
        tokens: sequence length to check.
        prefill: tokens processed in one chunked call before token-by-token decoding.
        json: print the report as JSON.
    """
    from .verify import verify as run_verify

    hf_model, _ = _load_converted(model)
    report = run_verify(hf_model, tokens=tokens, prefill=prefill)
    report["exit_code"] = 0 if report["ok"] else 1
    return report


def data(source: str, *, out: str, model: str | None = None, block_size: int = 512, json: bool = False) -> dict:
    """Build a tokenized corpus (train / held-out blocks) from text files, a directory, jsonl or a built-in corpus.

    Args:
        source: text file, directory, .jsonl, hf:NAME[:CONFIG[:SPLIT]], or a built-in corpus: austen, kjv, pydocs, mix.
        out: directory to write train.safetensors, heldout.safetensors and meta.json to.
        model: model whose tokenizer to use (default: the embedded SmolLM2-135M-Instruct).
        block_size: tokens per block.
        json: print the summary as JSON.
    """
    from .data import data_command

    return data_command(source, out, model=model, block_size=block_size)


def demo(*, out: str = "runs/demo", json: bool = False) -> dict:
    """A short pipeline on the embedded default model: convert (Hedgehog map + 64-token softmax window), a brief
    attention transfer on Jane Austen, then the teacher-vs-RNN perplexity table, text from both, decode speed and
    cache sizes. Rerunning reuses the finished stages in --out.

    Args:
        out: run directory.
        json: print the results as JSON.
    """
    from .pipeline import PipelineRecipe, run_pipeline

    return run_pipeline(PipelineRecipe.from_file("demo"), out)


def render(command: str, r: dict) -> str:
    """Human-readable text for a command's result."""
    if command in RENDERERS:
        return RENDERERS[command](r)
    if command == "convert":
        rec = r["recipe"]
        return (f"converted {r['source']} -> {r['out']}: {r['linear_layers']} linear attention layers "
                f"({rec['feature_map']}, feature_dim={rec['feature_dim']}, window={rec['window']}, "
                f"softmax kept: {rec['keep_softmax_layers'] or 'none'}), +{r['parameters_added']:,} parameters, "
                f"{r['seconds']} s")
    if command == "generate":
        return (f"{r['prompt']}{r['text']}\n\n[{r['new_tokens']} tokens in {r['seconds']} s, "
                f"{r['tokens_per_s']} tokens/s, state {fmt_bytes(r['state_bytes'])}]")
    if command == "verify":
        lines = [f"{k}: {v:.3g}" for k, v in r.items() if "max_rel_err" in k]
        bounds = f"tolerance {r['tolerance']} in {r['dtype']}" + (
            f", {r['exact_tolerance']} in float64" if "exact_tolerance" in r else "")
        return "\n".join(lines + [f"{'OK' if r['ok'] else 'MISMATCH'} ({bounds})"])
    if command == "data":
        return (f"{r['source']} -> {r['out']}: {r['train_tokens']:,} train tokens, {r['heldout_tokens']:,} held-out "
                f"tokens in blocks of {r['block_size']}")
    return str(r)


RENDERERS = {"eval": render_eval, "lm-eval": render_lm_eval, "pipeline": render_pipeline, "demo": render_pipeline,
             "bench": render_bench, "distill": render_distill, "finetune": render_finetune}
COMMANDS = [convert, generate, verify, data, distill, finetune, eval, lm_eval, pipeline, bench, demo]
