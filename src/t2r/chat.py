"""Chat with a model through its tokenizer's chat template, one turn after another.

    chat = Chat(model, tokenizer, max_new_tokens=128)
    reply = chat.say("What is the capital of France?")        # reply.text; streamer=TextStreamer(...) streams it
    reply = chat.say("And of Italy?")                          # reads only this turn's tokens

A converted model carries its recurrent state from one turn to the next: each turn feeds only its own new tokens
(the end of the previous reply, the user's message, the assistant's header) and the state keeps its size however
long the conversation gets. Where the template re-renders the history differently from what the model read (a
template that rewrites earlier turns), the turn is read from the start with a fresh state instead: the same text as
the template gives, so the reply is the one a fresh prefill gives. A plain (unconverted) model works too, with HF's
growing KV cache."""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch

from .adapters import cache_bytes
from .errors import T2RError
from .generate import GREEDY, Sampling, new_cache, prepare_tokenizer
from .rng import seeded as seeded_rng


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def chat_text(tokenizer, messages: list[dict]) -> str:
    """The text the model continues: `messages` ({"role", "content"} dicts) through the tokenizer's chat template,
    with the assistant's turn opened."""
    if not has_chat_template(tokenizer):
        raise T2RError("this model's tokenizer has no chat template: use plain text (`t2r generate --raw`)")
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


@dataclass
class Reply:
    text: str             # the assistant's answer (special tokens removed)
    read_tokens: int      # tokens read this turn before answering (all of them when the state was not reused)
    new_tokens: int       # tokens generated
    seconds: float        # wall time of reading + generating
    state_bytes: int      # recurrent state (converted) or KV cache (plain model) after the turn
    reused_state: bool    # whether the turn continued the previous state

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / max(self.seconds, 1e-9)


@dataclass
class Chat:
    """A conversation with `model` (see the module docstring). `system`: an optional system message."""

    model: object
    tokenizer: object
    system: str | None = None
    max_new_tokens: int = 256
    sampling: Sampling = GREEDY
    messages: list[dict] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.max_new_tokens <= 0:
            raise T2RError(f"max_new_tokens must be positive, got {self.max_new_tokens}")
        chat_text(self.tokenizer, [{"role": "user", "content": ""}])  # no template: stop now, not at the first turn
        prepare_tokenizer(self.tokenizer)
        self.reset()

    def reset(self) -> None:
        """Forget the conversation (the system message stays)."""
        self.messages = [{"role": "system", "content": self.system}] if self.system else []
        self._ids: torch.Tensor | None = None  # every token the model has been given or has generated [1, N]
        self._cache = None

    def _next_ids(self, text: str) -> tuple[torch.Tensor, bool]:
        """(all the conversation's ids with this turn's appended, whether the state so far can be kept)."""
        encode = lambda s: self.tokenizer(s, add_special_tokens=False, return_tensors="pt").input_ids  # noqa: E731
        if self._ids is not None:
            seen = self.tokenizer.decode(self._ids[0], skip_special_tokens=False)
            if text.startswith(seen) and len(text) > len(seen):
                return torch.cat([self._ids, encode(text[len(seen):]).to(self._ids.device)], dim=1), True
        return encode(text), False

    def _eos_ids(self) -> list[int]:
        """The end of a turn: the tokenizer's end token (an Instruct template's end of turn) and the model's own."""
        configured = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        configured = [configured] if isinstance(configured, int) else list(configured or [])
        return list(dict.fromkeys([t for t in [self.tokenizer.eos_token_id, *configured] if t is not None]))

    @torch.inference_mode()
    def say(self, content: str, *, streamer=None) -> Reply:
        """The assistant's reply to the user's `content`; `streamer` (an HF streamer) gets the tokens as they come."""
        messages = [*self.messages, {"role": "user", "content": content}]
        device = next(self.model.parameters()).device
        ids, reuse = self._next_ids(chat_text(self.tokenizer, messages))
        ids = ids.to(device)
        if not reuse:
            self._cache = new_cache(self.model)
        read = ids.shape[1] - (self._ids.shape[1] - 1 if reuse else 0)  # the last token generated was never read
        seeded = self.sampling.do_sample and self.sampling.seed is not None
        start = time.perf_counter()
        with seeded_rng(self.sampling.seed, device) if seeded else nullcontext():
            out = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), cache=self._cache,
                                      max_new_tokens=self.max_new_tokens, pad_token_id=self.tokenizer.pad_token_id,
                                      eos_token_id=self._eos_ids(), streamer=streamer,
                                      **self.sampling.hf_options())
        seconds = time.perf_counter() - start
        new = out[:, ids.shape[1]:]
        text = self.tokenizer.decode(new[0], skip_special_tokens=True)
        self._ids = out
        self.messages = [*messages, {"role": "assistant", "content": text}]
        return Reply(text=text, read_tokens=int(read), new_tokens=int(new.shape[1]), seconds=seconds,
                     state_bytes=cache_bytes(self._cache), reused_state=reuse)
