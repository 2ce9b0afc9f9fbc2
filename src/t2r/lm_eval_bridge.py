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
from pathlib import Path

import torch
from transformers import AutoTokenizer

from .adapters import original_model
from .data import cache_root, load_documents, prepare_data, tokenizer_identity
from .errors import T2RError
from .io import write_text
from .persistence import check_weight_files, is_t2r_dir, load, load_tokenizer
from .sources import load_model
from .tasks import AUSTEN_BLOCKS, TASKS_DIR, TEXT_TASK  # noqa: F401  (TASKS_DIR: re-exported)

log = logging.getLogger(__name__)

TEXT_ENV = "T2R_LM_EVAL_TEXT"


def require_lm_eval():
    try:
        import lm_eval
    except ImportError as err:
        raise T2RError("lm-evaluation-harness is not installed: pip install 't2r[lm-eval]'") from err
    return lm_eval


# ----------------------------------------------------------------------------- the t2r_text task's data


def austen_heldout_file(tokenizer, *, blocks: int = AUSTEN_BLOCKS, cache_dir: str | Path | None = None) -> Path:
    """A .jsonl of the first `blocks` held-out Austen blocks (512 tokens of `tokenizer` each, the split of
    `t2r data austen`), decoded back to text, one document per block; written once under the t2r cache."""
    if blocks <= 0:
        raise T2RError(f"the Austen chunk needs a positive number of blocks, got {blocks}")
    tag = hashlib.sha256(_json.dumps(tokenizer_identity(tokenizer), sort_keys=True).encode()).hexdigest()[:12]
    path = cache_root(cache_dir) / "lm_eval" / f"austen-heldout-{blocks}x512-{tag}.jsonl"
    if path.is_file():
        return path
    heldout = prepare_data("austen", tokenizer, block_size=512, cache_dir=cache_dir).heldout[:blocks]
    lines = [_json.dumps({"text": tokenizer.decode(row.tolist(), skip_special_tokens=True)}) for row in heldout]
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, "\n".join(lines) + "\n")
    log.info("wrote %d held-out Austen blocks to %s", len(lines), path)
    return path


def _tokenizer_of(pretrained: str):
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
    return Path(model).is_dir() and is_t2r_dir(Path(model))


def make_lm(model: str, original: bool, context: int, batch_size: int, device: str, dtype: str = "float32"):
    """(lm-eval model name or LM object, model_args, tokenizer, which) for `simple_evaluate`; `dtype` names the
    weights' dtype (a converted model's recurrent state stays float32 whatever it is)."""
    args = {"max_length": context, "dtype": dtype, "backend": "causal"}  # device: simple_evaluate's own
    if Path(model).is_dir():  # lm-eval loads it itself: refuse pickles and damaged files first
        check_weight_files(model)
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

        hf_model, tokenizer, which = original_model(load(model, dtype=getattr(torch, dtype))), \
            load_tokenizer(model), "original"
    else:  # a GGUF file or hub id: load it the way t2r does (dequantized), hand lm-eval the instance

        hf_model, tokenizer, _ = load_model(model, dtype=getattr(torch, dtype))
        which = "plain"
    hf_model = hf_model.to(device)
    lm = HFLM(pretrained=hf_model, tokenizer=tokenizer, max_length=context, batch_size=batch_size,
              backend="causal")
    return lm, None, tokenizer, which


def task_metrics(results: dict) -> dict:
    """lm-eval's {"word_perplexity,none": x, "alias": ...} -> {"word_perplexity": x} (numbers only)."""
    out = {}
    for task, values in results.items():
        out[task] = {key.split(",")[0]: value for key, value in values.items()
                     if isinstance(value, (int, float)) and "_stderr" not in key and key != "sample_len"}
    return out


# ----------------------------------------------------------------------------- `python -m t2r.lm_eval_bridge`


def main(argv: list[str] | None = None) -> None:
    """lm-eval's own command line with t2r imported and t2r's task folder as --include_path (unless one is given)."""
    require_lm_eval()
    from lm_eval.__main__ import cli_evaluate

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and not any(a == "--include_path" or a.startswith("--include_path=") for a in argv):
        argv += ["--include_path", str(TASKS_DIR)]
    sys.argv = ["lm-eval", *argv]
    cli_evaluate()


if __name__ == "__main__":
    main()
