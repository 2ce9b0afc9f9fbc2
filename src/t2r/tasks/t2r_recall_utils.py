"""Functions the `t2r_passkey` and `t2r_mqar` task YAMLs name (lm-eval loads this file by path, next to the YAMLs).

The samples are those of `t2r recall` (t2r.recall_tasks), one document per query, its right answer shuffled among
the distractors with a seeded generator. Prompts are sized with the model's tokenizer, taken from `tokenizer` or
`pretrained` in the task metadata (lm-eval merges `--model_args` into it when no task manager is given; otherwise
pass `--metadata '{"tokenizer": "DIR"}'`). Metadata also sets the cells: `lengths` ("1k,2k"), `depths` ("0,0.5,1"),
`pairs` ("8,32"), `samples`, `seed`, `distractors`, `queries`.
"""

from __future__ import annotations

import functools
import random

from t2r.data import tokenizer_of
from t2r.errors import T2RError
from t2r.recall import RECALL_TASKS, RecallSettings, parse_depths, parse_lengths, parse_pairs

PARSERS = {"lengths": parse_lengths, "depths": parse_depths, "pairs": parse_pairs}
NUMBERS = ("samples", "seed", "distractors", "queries")


_load_tokenizer = functools.lru_cache(maxsize=4)(tokenizer_of)  # a directory, a GGUF file or a hub id


def task_tokenizer(task: str, tokenizer=None, pretrained=None):
    """The tokenizer named by the metadata (`tokenizer` first, then `pretrained`), or a tokenizer object given there."""
    for candidate in (tokenizer, pretrained):
        if isinstance(candidate, str) and candidate:
            return _load_tokenizer(candidate)
        if hasattr(candidate, "encode"):
            return candidate
    raise T2RError(f"task {task} sizes its prompts with the model's tokenizer: pass --model_args pretrained=DIR "
                   f"(or tokenizer=DIR), or --metadata '{{\"tokenizer\": \"DIR\"}}'")


def task_settings(task: str, metadata: dict) -> RecallSettings:
    """RecallSettings from task metadata: strings like "1k,2k" or lists for the cells, numbers for the rest."""
    values = {}
    for key, parse in PARSERS.items():
        if key in metadata:
            raw = metadata[key]
            values[key] = parse(",".join(map(str, raw)) if isinstance(raw, (list, tuple)) else str(raw))
    values.update({key: int(metadata[key]) for key in NUMBERS if key in metadata})
    return RecallSettings(task=task, **values)


def recall_docs(task: str, settings: RecallSettings, tokenizer) -> list[dict]:
    """One document per query: its context (the sample's context, earlier queries and their answers, the query),
    the choices (right answer among the distractors, seeded order), the gold index and the cell."""
    docs = []
    for cell, samples in RECALL_TASKS.get(task)(tokenizer, settings):
        for sample in samples:
            text = sample.context
            for query in sample.queries:
                text += query.text
                options = [query.answer, *query.distractors]
                order = list(range(len(options)))
                random.Random(f"t2r-choices/{settings.seed}/{len(docs)}").shuffle(order)
                docs.append({**cell, "context": text, "choices": [options[k] for k in order],
                             "gold": order.index(0), "answer": query.answer})
                text += query.answer
    return docs


def _dataset(task: str, kwargs: dict) -> dict:
    import datasets

    tokenizer = task_tokenizer(f"t2r_{task}", kwargs.get("tokenizer"), kwargs.get("pretrained"))
    return {"test": datasets.Dataset.from_list(recall_docs(task, task_settings(task, kwargs), tokenizer))}


def load_passkey(**kwargs) -> dict:
    """lm-eval `custom_dataset` of `t2r_passkey`: {"test": Dataset} of passkey queries."""
    return _dataset("passkey", kwargs)


def load_mqar(**kwargs) -> dict:
    """lm-eval `custom_dataset` of `t2r_mqar`: {"test": Dataset} of MQAR queries."""
    return _dataset("mqar", kwargs)


def doc_to_text(doc: dict) -> str:
    return doc["context"]


def doc_to_choice(doc: dict) -> list[str]:
    return doc["choices"]


def doc_to_target(doc: dict) -> int:
    return doc["gold"]


def process_generation(doc: dict, results: list[str]) -> dict:
    """For a generate_until variant: correct iff the generated text, stripped of spaces, starts with the answer."""
    return {"acc": float(results[0].strip().startswith(doc["answer"].strip()))}
