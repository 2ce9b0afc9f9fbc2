"""lm-evaluation-harness as a client of t2r: a converted model is an ordinary HF model to lm-eval once `import t2r`
has registered its classes with `AutoModelForCausalLM`.

Three ways in (lm-eval is the optional dependency `t2r[lm-eval]`):

    t2r lm-eval runs/smol-rnn                       # t2r_text over a held-out Austen chunk; --original: the teacher
    python -m t2r.lm_eval_bridge --model hf --model_args pretrained=runs/smol-rnn --tasks t2r_text \\
        --metadata '{"text": "my.txt"}'              # lm-eval's own CLI, with t2r imported and its tasks included
    import t2r, lm_eval; lm_eval.simple_evaluate(model="hf", model_args="pretrained=runs/smol-rnn", ...,
        task_manager=lm_eval.tasks.TaskManager(include_path=t2r.lm_eval_bridge.TASKS_DIR))

The shipped task `t2r_text` (src/t2r/tasks/t2r_text.yaml) is a `loglikelihood_rolling` task over a local text, so no
hub dataset is needed; `t2r eval MODEL --text FILE --context N` computes the same figures with t2r's own code.
"""

from __future__ import annotations

import hashlib
import json as _json
import logging
import os
import sys
import time
from pathlib import Path

from .errors import T2RError

log = logging.getLogger(__name__)

TASKS_DIR = Path(__file__).parent / "tasks"
TEXT_TASK = "t2r_text"
TEXT_ENV = "T2R_LM_EVAL_TEXT"
AUSTEN_BLOCKS = 16  # held-out blocks of 512 tokens in the default text: about 8k tokens


def _require_lm_eval():
    try:
        import lm_eval
    except ImportError as err:
        raise T2RError("lm-evaluation-harness is not installed: pip install 't2r[lm-eval]'") from err
    return lm_eval


# ----------------------------------------------------------------------------- the t2r_text task's data


def austen_heldout_file(tokenizer, *, blocks: int = AUSTEN_BLOCKS, cache_dir: str | Path | None = None) -> Path:
    """A .jsonl of the first `blocks` held-out Austen blocks (512 tokens of `tokenizer` each, the split of
    `t2r data austen`), decoded back to text, one document per block; written once under the t2r cache."""
    from .data import cache_root, prepare_data, tokenizer_identity

    if blocks <= 0:
        raise T2RError(f"the Austen chunk needs a positive number of blocks, got {blocks}")
    tag = hashlib.sha256(_json.dumps(tokenizer_identity(tokenizer), sort_keys=True).encode()).hexdigest()[:12]
    path = cache_root(cache_dir) / "lm_eval" / f"austen-heldout-{blocks}x512-{tag}.jsonl"
    if path.is_file():
        return path
    heldout = prepare_data("austen", tokenizer, block_size=512, cache_dir=cache_dir).heldout[:blocks]
    lines = [_json.dumps({"text": tokenizer.decode(row.tolist(), skip_special_tokens=True)}) for row in heldout]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    log.info("wrote %d held-out Austen blocks to %s", len(lines), path)
    return path


def _tokenizer_of(pretrained: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(pretrained))
    except (OSError, ValueError) as err:
        raise T2RError(f"cannot load the tokenizer of {pretrained!r} to write the default text ({err}); "
                       f"pass the text: --metadata '{{\"text\": \"FILE\"}}'") from err


def load_dataset(text: str | None = None, pretrained=None, **_ignored) -> dict:
    """lm-eval `custom_dataset` of `t2r_text`: {"test": Dataset with a "text" column}. It receives the task metadata
    merged with the model args: `text` names the file, else $T2R_LM_EVAL_TEXT; without either, the held-out Austen
    chunk tokenised with `pretrained`'s tokenizer."""
    import datasets

    from .data import load_documents

    text = text or os.environ.get(TEXT_ENV)
    if not text:
        if not isinstance(pretrained, str):
            raise T2RError(f"task {TEXT_TASK} needs a text: --metadata '{{\"text\": \"FILE\"}}' or ${TEXT_ENV}")
        text = str(austen_heldout_file(_tokenizer_of(pretrained)))
    log.info("%s: reading %s", TEXT_TASK, text)
    return {"test": datasets.Dataset.from_dict({"text": load_documents(str(text))})}


def doc_to_target(doc: dict) -> str:
    return doc["text"]


# ----------------------------------------------------------------------------- the `t2r lm-eval` command


def _is_converted(model: str) -> bool:
    from .persistence import _is_t2r_dir

    return Path(model).is_dir() and _is_t2r_dir(Path(model))


def _lm(model: str, original: bool, context: int, batch_size: int, device: str):
    """(lm-eval model name or LM object, model_args, tokenizer, which) for `simple_evaluate`."""
    from .persistence import load_tokenizer

    args = {"max_length": context, "dtype": "float32", "backend": "causal"}  # device: simple_evaluate's own
    if not original and Path(model).is_dir():  # the ordinary path: lm-eval loads the directory itself
        tokenizer = load_tokenizer(model)
        if tokenizer is None:
            raise T2RError(f"{model!r} has no tokenizer files beside the model")
        return "hf", {"pretrained": str(model), **args}, tokenizer, "converted" if _is_converted(model) else "plain"
    from lm_eval.models.huggingface import HFLM

    if original:
        if not _is_converted(model):
            raise T2RError(f"--original rebuilds the softmax model of a converted one; {model!r} is not a converted "
                           "model directory (evaluate a plain model without --original)")
        from .adapters import original_model
        from .persistence import load

        hf_model, tokenizer, which = original_model(load(model)), load_tokenizer(model), "original"
    else:  # a GGUF file or hub id: load it the way t2r does (dequantized), hand lm-eval the instance
        from .sources import load_model

        hf_model, tokenizer, _ = load_model(model)
        which = "plain"
    hf_model = hf_model.to(device)
    lm = HFLM(pretrained=hf_model, tokenizer=tokenizer, max_length=context, batch_size=batch_size,
              backend="causal")
    return lm, None, tokenizer, which


def _metrics(results: dict) -> dict:
    """lm-eval's {"word_perplexity,none": x, "alias": ...} -> {"word_perplexity": x} (numbers only)."""
    out = {}
    for task, values in results.items():
        out[task] = {key.split(",")[0]: value for key, value in values.items()
                     if isinstance(value, (int, float)) and "_stderr" not in key and key != "sample_len"}
    return out


def lm_eval(model: str, *, tasks: str = TEXT_TASK, text: str | None = None, original: bool = False,
            context: int = 512, limit: int | None = None, batch_size: int = 1, austen_blocks: int = AUSTEN_BLOCKS,
            device: str = "cpu", json: bool = False) -> dict:
    """Run lm-evaluation-harness on a model, with t2r imported and its local tasks available.

    Args:
        model: directory of a converted (or any HF) model, loaded by lm-eval as `--model hf`; or a GGUF file.
        tasks: comma-separated lm-eval task names; t2r_text is t2r's local rolling-perplexity task.
        text: text file, .jsonl (field "text") or folder for t2r_text; default: a held-out Austen chunk.
        original: evaluate the original softmax model rebuilt from the converted model's weights.
        context: lm-eval's max_length: the rolling window, in tokens.
        limit: evaluate only the first N documents of each task.
        batch_size: windows per forward pass.
        austen_blocks: held-out Austen blocks of 512 tokens in the default text.
        device: cpu, cuda, cuda:0, ...
        json: print the result as JSON.
    """
    _require_lm_eval()
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from . import adapters  # noqa: F401  (registers the converted classes with AutoModelForCausalLM)

    if context < 2:
        raise T2RError(f"--context must be at least 2 tokens, got {context}")
    if batch_size <= 0 or (limit is not None and limit <= 0):
        raise T2RError("--batch-size and --limit must be positive")
    if not (Path(model).exists() or model.count("/") <= 1):
        raise T2RError(f"no such model directory or file: {model!r}")
    task_list = [t.strip() for t in tasks.split(",") if t.strip()]
    start = time.perf_counter()
    lm, model_args, tokenizer, which = _lm(model, original, context, batch_size, device)
    if TEXT_TASK in task_list and text is None:
        text = str(austen_heldout_file(tokenizer, blocks=austen_blocks))
    if text is not None and not Path(text).exists():
        raise T2RError(f"--text {text!r} does not exist")
    ours = {p.stem for p in TASKS_DIR.glob("*.yaml")}
    manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=not set(task_list) <= ours,
                          metadata={"text": text} if text else {})  # indexing lm-eval's own tasks takes seconds
    log.info("lm-eval %s on %s (%s model)", ",".join(task_list), model, which)
    results = simple_evaluate(model=lm, model_args=model_args, tasks=task_list, batch_size=batch_size,
                              device=device, limit=limit, task_manager=manager, log_samples=False,
                              bootstrap_iters=0)
    if results is None:  # a non-zero rank in a distributed run
        return {}
    import lm_eval as _lm_eval_package

    return {"model": model, "which": which, "tasks": task_list, "text": text, "context": context,
            "limit": limit, "lm_eval_version": getattr(_lm_eval_package, "__version__", "unknown"),
            "results": _metrics(results["results"]), "seconds": round(time.perf_counter() - start, 2)}


def render_lm_eval(r: dict) -> str:
    """The lines `t2r lm-eval` prints."""
    lines = [f"lm-eval {r['lm_eval_version']}: {r['model']} ({r['which']} model), max_length {r['context']}"
             + (f", text {r['text']}" if r.get("text") else "")]
    for task, metrics in r["results"].items():
        lines += [f"{task}:"] + [f"  {name:16} {value:.6g}" for name, value in sorted(metrics.items())]
    lines.append(f"[{r['seconds']} s]")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- `python -m t2r.lm_eval_bridge`


def main(argv: list[str] | None = None) -> None:
    """lm-eval's own command line with t2r imported and t2r's task folder as --include_path (unless one is given)."""
    import t2r  # noqa: F401  (registers the converted classes)

    _require_lm_eval()
    from lm_eval.__main__ import cli_evaluate

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and not any(a == "--include_path" or a.startswith("--include_path=") for a in argv):
        argv += ["--include_path", str(TASKS_DIR)]
    sys.argv = ["lm-eval", *argv]
    cli_evaluate()


if __name__ == "__main__":
    main()
