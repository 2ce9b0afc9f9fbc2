"""Commands that make and use a converted model: `t2r convert`, `t2r generate`, `t2r verify`."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from ..adapters import is_converted, original_model
from ..attention import is_conversion_parameter
from ..convert import convert, count_linear_layers, reinitialize
from ..errors import T2RError
from ..generate import Sampling, generate
from ..io import check_writable, refuse_symlink
from ..persistence import is_t2r_dir, load, load_tokenizer, save
from ..recipe import INITS
from ..sources import load_model
from ..stages.recipes import ConvertSettings
from ..verify import check_weights, verify

log = logging.getLogger("t2r")


DEMO_PROMPT = "It is a truth universally acknowledged"


def convert_command(model: str | None = None, *, options: ConvertSettings = ConvertSettings(),
                    init: str = "pretrained", out: str = "runs/rnn", overwrite: bool = False,
                    as_json: bool = False) -> dict:
    """Convert a pretrained causal LM's softmax attention to linear attention and save it.

    Args:
        model: GGUF file, HF model directory or hub id; default: the embedded SmolLM2-135M-Instruct.
        options: the conversion recipe, as a recipe's `convert:` takes it.
        init: pretrained, or random: throw the pretrained weights away first (the same RNN from random initialisation, a baseline).
        out: directory to write the converted model to (safetensors + JSON, written atomically).
        overwrite: replace --out if it already holds a t2r model.
        as_json: print the result as JSON.
    """
    if init not in INITS:
        raise T2RError(f"--init is {' or '.join(INITS)}, got {init!r}")
    check_writable(out)  # before minutes of loading
    if overwrite:
        refuse_symlink(out)
    start = time.perf_counter()
    hf_model, tokenizer, source = load_model(model)
    if init == "random":
        reinitialize(hf_model, seed=options.seed)
    recipe = options.recipe()
    log.info("converting %s: %s, feature_dim=%s, mixer=%s", source.describe(), recipe.feature_map,
             recipe.feature_dim, recipe.mixer)
    converted = convert(hf_model, recipe, seed=options.seed, convert_layers=options.convert_layers)
    log.info("saving to %s", out)
    save(converted, out, tokenizer, overwrite=overwrite)
    return {"source": source.describe(), "out": out, "init": init, "recipe": converted.config.t2r,
            "linear_layers": count_linear_layers(converted),
            "parameters_added": sum(p.numel() for n, p in converted.named_parameters()
                                    if is_conversion_parameter(n)),
            "seconds": round(time.perf_counter() - start, 2)}


def load_converted(path: str, *, need_tokenizer: bool = True):
    """(model, tokenizer) of a converted directory; without tokenizer files a command that needs them stops."""
    log.info("loading %s", path)
    model, tokenizer = load(path), load_tokenizer(path)
    check_weights(model)
    if tokenizer is None and need_tokenizer:
        raise T2RError(f"{path!r} has no tokenizer files: convert it again with `t2r convert` (it saves one)")
    return model, tokenizer


def load_any(model: str):
    """(model, tokenizer): a converted directory with `t2r.load`, anything else (GGUF file, HF directory, hub id)
    through `t2r.sources`; a tokenizer is required."""
    if Path(model).is_dir() and is_t2r_dir(Path(model)):
        return load_converted(model)
    loaded, tokenizer, _ = load_model(model)
    check_weights(loaded)
    if tokenizer is None:
        raise T2RError(f"{model!r} has no tokenizer files: save it with its tokenizer (t2r convert does)")
    return loaded, tokenizer


def generate_command(model: str, *, prompt: str = DEMO_PROMPT, max_new_tokens: int = 64, sample: bool = False,
                     temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, seed: int = 0,
                     as_json: bool = False) -> dict:
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
        as_json: print the result as JSON.
    """
    if max_new_tokens <= 0:
        raise T2RError(f"--max-new-tokens must be positive, got {max_new_tokens}")
    sampling = Sampling(do_sample=sample, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    hf_model, tokenizer = load_converted(model)
    result = generate(hf_model, tokenizer, prompt, max_new_tokens=max_new_tokens, sampling=sampling)
    return {"prompt": prompt, "text": result.texts[0], "new_tokens": result.new_tokens,
            "seconds": round(result.seconds, 3), "tokens_per_s": round(result.tokens_per_s, 2),
            "state_bytes": result.state_bytes}


def verify_command(model: str, *, tokens: int = 100, prefill: int = 67, as_json: bool = False) -> dict:
    """Check that the parallel, chunked and recurrent forms give the same logits (exit code 1 if not).

    Args:
        model: directory of a converted model.
        tokens: sequence length to check.
        prefill: tokens processed in one chunked call before token-by-token decoding.
        as_json: print the report as JSON.
    """
    hf_model, _ = load_converted(model, need_tokenizer=False)
    report = verify(hf_model, tokens=tokens, prefill=prefill)
    report["exit_code"] = 0 if report["ok"] else 1
    return report


def load_with_teacher(model: str):
    """(student or None, a function returning the teacher, tokenizer): a converted directory gives the student and
    its original rebuilt from the same weights; any other source (GGUF file, HF directory, hub id) is the teacher
    alone (`eval`, `recall`)."""
    loaded, tokenizer = load_any(model)
    if is_converted(loaded):
        return loaded, lambda: original_model(loaded), tokenizer
    return None, lambda: loaded, tokenizer
