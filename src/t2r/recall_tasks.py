"""The synthetic recall tasks, generated locally from a seed (no download): passkey retrieval and multi-query
associative recall (MQAR). A task is a registry entry that turns `RecallSettings` into cells of `RecallSample`s;
`t2r.recall` scores them with a model. Every sample is a pure function of (seed, cell, index).

    passkey  a 5-digit number hidden at relative depth d of about L tokens of the classic filler text
    mqar     N "key: value" lines (3-letter keys, 4-digit values), then queries "key:" for some of the keys
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import asdict, dataclass

from .bench import parse_sizes
from .errors import T2RError
from .registry import Registry

RECALL_TASKS = Registry("recall task", T2RError)

HEADER = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
          "I will quiz you about the important information there.")
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key? The pass key is"
MQAR_HEADER = "Here is a list of keys and their values. Remember them: you will be asked for some of the values."
MQAR_RECALL = "\n\nThe values of some of the keys:"
FILLER_WORDS = FILLER.split()
SEARCH_STEP = 8  # words: the first bracket around the estimated filler size


@dataclass(frozen=True)
class Query:
    """One question of a sample: `text` is fed after what came before (empty when the context already asks it),
    then `answer` is the right continuation and `distractors` are wrong ones of the same form."""

    text: str
    answer: str
    distractors: tuple[str, ...]


@dataclass(frozen=True)
class RecallSample:
    """A context and its queries, answered in order: query i sees the context, the earlier queries and their right
    answers. `tokens`: the context's exact length in tokens (passkey; 0 where the tokenizer was not needed)."""

    context: str
    queries: tuple[Query, ...]
    tokens: int = 0


@dataclass(frozen=True)
class RecallSettings:
    """What `t2r.recall.run_recall` measures: the task, its cells (lengths x depths for passkey, numbers of pairs
    for mqar), samples per cell, wrong answers per query, queries per mqar sample, the seed, and the greedy budget."""

    task: str = "passkey"
    lengths: tuple[int, ...] = (1024, 2048, 4096)
    depths: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    pairs: tuple[int, ...] = (8, 32, 128)
    samples: int = 20
    distractors: int = 9
    queries: int = 16
    seed: int = 0
    generate_tokens: int = 8

    def __post_init__(self):
        RECALL_TASKS.get(self.task)  # an unknown task raises, listing the known ones
        object.__setattr__(self, "lengths", tuple(int(n) for n in self.lengths))  # normalized: JSON-able, hashable
        object.__setattr__(self, "depths", tuple(float(d) for d in self.depths))
        object.__setattr__(self, "pairs", tuple(int(n) for n in self.pairs))
        if not all(0.0 <= d <= 1.0 for d in self.depths) or min(self.lengths + self.pairs, default=1) <= 0:
            raise T2RError(f"recall depths must lie in [0, 1] and lengths and pairs be positive; got {self}")
        for name in ("samples", "distractors", "queries", "generate_tokens"):
            if int(getattr(self, name)) <= 0:
                raise T2RError(f"recall {name} must be a positive number, got {getattr(self, name)!r}")
        if self.distractors > 999:
            raise T2RError(f"recall distractors must be at most 999, got {self.distractors}")

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


# ----------------------------------------------------------------------------- parsing "1k,2k", "0,0.5", "8,32"


def parse_lengths(spec: str) -> tuple[int, ...]:
    """"1k,2k,4k" -> (1024, 2048, 4096) (k = 1024), sorted and unique; garbage raises T2RError."""
    return tuple(parse_sizes(str(spec), "--lengths"))


def parse_pairs(spec: str) -> tuple[int, ...]:
    """"8,32,128" -> (8, 32, 128), sorted and unique; garbage raises T2RError."""
    pairs = tuple(parse_sizes(str(spec), "--pairs"))
    if pairs[-1] > 4096:
        raise T2RError(f"--pairs takes at most 4096 key-value pairs per prompt; got {pairs[-1]} in {spec!r}")
    return pairs


def parse_depths(spec: str) -> tuple[float, ...]:
    """"0,0.25,1" -> (0.0, 0.25, 1.0): relative depths in [0, 1], sorted and unique; garbage raises T2RError."""
    depths = set()
    for part in str(spec).replace(" ", "").split(","):
        if not part:
            continue
        try:
            value = float(part)
        except ValueError:
            raise T2RError(f"--depths takes comma-separated numbers in [0, 1] like 0,0.25,0.5; got {spec!r}") from None
        if not 0.0 <= value <= 1.0:
            raise T2RError(f"--depths must lie in [0, 1] (0 = start, 1 = end of the text); got {part!r} in {spec!r}")
        depths.add(value)
    if not depths:
        raise T2RError("--depths is empty; give depths in [0, 1] like 0,0.25,0.5,0.75,1")
    return tuple(sorted(depths))


# ----------------------------------------------------------------------------- passkey


def _filler(words: int, depth: float) -> tuple[str, str]:
    """The last `words` words of the repeated filler (so it ends with a whole sentence; only its first sentence may
    be cut), split at the sentence boundary nearest to depth * words (0: all after the needle, 1: all before it)."""
    text = [FILLER_WORDS[(i - words) % len(FILLER_WORDS)] for i in range(words)]
    bounds = [0] + [i + 1 for i, w in enumerate(text) if w.endswith(".")] + [words]
    cut = min(bounds, key=lambda b: (abs(b - depth * words), b))
    return " ".join(text[:cut]), " ".join(text[cut:])


def passkey_text(key: str, words: int, depth: float) -> str:
    before, after = _filler(words, depth)
    parts = [HEADER, before, NEEDLE.format(key=key), after, QUESTION]
    return " ".join(p for p in parts if p)


def _fit_words(count, length: int) -> int:
    """The largest filler size (in words) whose prompt takes at most `length` tokens; `count(words)` -> tokens."""
    base = count(0)
    if base > length:
        raise T2RError(f"a passkey prompt needs at least {base} tokens of this tokenizer; --lengths asked {length}")
    rate = max((count(64) - base) / 64, 1e-3)  # tokens per filler word
    guess = max(int((length - base) / rate), 0)
    if count(guess) <= length:
        lo, hi = guess, guess + SEARCH_STEP
        while count(hi) <= length:  # widen upwards until too long
            lo, hi = hi, hi + 2 * (hi - lo)
    else:
        lo, hi = max(guess - SEARCH_STEP, 0), guess
        while count(lo) > length:  # widen downwards; count(0) fits
            lo, hi = max(lo - 2 * (hi - lo), 0), lo
    while hi - lo > 1:  # count(lo) <= length < count(hi)
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if count(mid) <= length else (lo, mid)
    return lo


def _numbers(rng: random.Random, digits: int, count: int, exclude: set[str]) -> list[str]:
    """`count` distinct random `digits`-digit numbers, none in `exclude`."""
    out: list[str] = []
    while len(out) < count:
        value = str(rng.randrange(10 ** (digits - 1), 10**digits))
        if value not in exclude and value not in out:
            out.append(value)
    return out


def passkey_sample(tokenizer, length: int, depth: float, index: int, *, seed: int = 0,
                   distractors: int = 9) -> RecallSample:
    """Sample `index` of the (length, depth) cell: the classic passkey prompt (header, filler, the needle "The pass key
    is NNNNN. Remember it. NNNNN is the pass key." at relative depth `depth` of the filler, then "What is the pass
    key? The pass key is"), answered by " NNNNN" against `distractors` other 5-digit numbers.

    Its length in tokens of `tokenizer` (special tokens included, as `tokenizer(context)` gives them) is recorded in
    `tokens`: the largest filler that fits, so `length - tokens` is below the tokens of one filler word (a few).
    The same (seed, length, depth, index) gives the same sample."""
    rng = random.Random(f"t2r-passkey/{seed}/{length}/{float(depth)!r}/{index}")
    key, *wrong = _numbers(rng, 5, 1 + distractors, set())

    def count(words: int) -> int:
        return len(tokenizer(passkey_text(key, words, depth))["input_ids"])

    words = _fit_words(count, length)
    context = passkey_text(key, words, depth)
    query = Query(text="", answer=f" {key}", distractors=tuple(f" {w}" for w in wrong))
    return RecallSample(context=context, queries=(query,), tokens=count(words))


@RECALL_TASKS.register("passkey")
def passkey_cells(tokenizer, settings: RecallSettings) -> Iterator[tuple[dict, list[RecallSample]]]:
    for length in settings.lengths:
        for depth in settings.depths:
            samples = [passkey_sample(tokenizer, length, depth, i, seed=settings.seed,
                                      distractors=settings.distractors) for i in range(settings.samples)]
            yield {"length": int(length), "depth": float(depth)}, samples


# ----------------------------------------------------------------------------- multi-query associative recall


def _keys(rng: random.Random, count: int) -> list[str]:
    keys: list[str] = []
    while len(keys) < count:
        key = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(3))
        if key not in keys:
            keys.append(key)
    return keys


def mqar_sample(pairs: int, index: int, *, seed: int = 0, queries: int = 16, distractors: int = 9) -> RecallSample:
    """Sample `index` with `pairs` random "key: value" lines (distinct 3-letter keys, distinct 4-digit values), then
    "key:" queries for min(queries, pairs) of the keys in random order, each answered by " value" against
    `distractors` wrong values: values of other keys of the same list first, then random 4-digit numbers.
    The same (seed, pairs, index) gives the same sample; it needs no tokenizer (`tokens` is 0)."""
    rng = random.Random(f"t2r-mqar/{seed}/{pairs}/{index}")
    keys, values = _keys(rng, pairs), _numbers(rng, 4, pairs, set())
    lines = "\n".join(f"{k}: {v}" for k, v in zip(keys, values))
    asked = []
    for i in rng.sample(range(pairs), min(queries, pairs)):
        others = rng.sample([v for j, v in enumerate(values) if j != i], min(distractors, pairs - 1))
        others += _numbers(rng, 4, distractors - len(others), set(values))
        asked.append(Query(text=f"\n{keys[i]}:", answer=f" {values[i]}", distractors=tuple(f" {v}" for v in others)))
    return RecallSample(context=f"{MQAR_HEADER}\n{lines}{MQAR_RECALL}", queries=tuple(asked))


@RECALL_TASKS.register("mqar")
def mqar_cells(tokenizer, settings: RecallSettings) -> Iterator[tuple[dict, list[RecallSample]]]:
    for pairs in settings.pairs:
        samples = [mqar_sample(pairs, i, seed=settings.seed, queries=settings.queries,
                               distractors=settings.distractors) for i in range(settings.samples)]
        yield {"pairs": int(pairs)}, samples
