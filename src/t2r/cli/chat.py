"""`t2r chat`: a conversation with a converted model, one line of stdin per user message (interactive, or piped)."""

from __future__ import annotations

import logging
import sys

from ..errors import T2RError
from .models import SamplingSettings, load_converted, text_streamer, torch_dtype

log = logging.getLogger("t2r")

EXIT_WORDS = ("/exit", "/quit")
RESET_WORD = "/reset"


def chat_command(model: str, *, system: str | None = None, max_new_tokens: int = 256, stream: bool = True,
                 options: SamplingSettings | None = None, dtype: str = "float32", as_json: bool = False) -> dict:
    """Chat with a converted model: each line of stdin is a message, each reply is printed as it is generated.

    The tokenizer's chat template frames the conversation. The recurrent state is carried from turn to turn, so a turn
    reads only its own tokens and the state keeps its size. /reset starts over, /exit (or the end of the input,
    Ctrl-D) ends.

    Args:
        model: directory of a converted model (from `t2r convert`) whose tokenizer has a chat template.
        system: a system message.
        max_new_tokens: the longest reply, in tokens.
        stream: print each reply as it is generated (not with --json).
        options: how each token is picked: greedy, or sampled.
        dtype: weights in float32, bfloat16 or float16 (the recurrent state stays float32).
        as_json: print the conversation as JSON at the end instead of each reply as it comes.
    """
    if max_new_tokens <= 0:
        raise T2RError(f"--max-new-tokens must be positive, got {max_new_tokens}")
    torch_dtype(dtype)
    from ..chat import Chat, has_chat_template
    from ..persistence import load_tokenizer

    sampling = (options or SamplingSettings()).sampling()
    tokenizer = load_tokenizer(model)
    if tokenizer is not None and not has_chat_template(tokenizer):  # before minutes of loading the model
        raise T2RError(f"{model!r} has a tokenizer without a chat template: use `t2r generate {model} --raw`")
    hf_model, tokenizer = load_converted(model, dtype=dtype)
    talk = Chat(hf_model, tokenizer, system=system, max_new_tokens=max_new_tokens, sampling=sampling)
    interactive, printing = sys.stdin.isatty(), not as_json
    if interactive:
        print(f"chatting with {model}: {RESET_WORD} starts over, {EXIT_WORDS[0]} or Ctrl-D ends", file=sys.stderr)
    turns = []
    while True:
        if interactive:
            print("you> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line or line.strip() in EXIT_WORDS:
            break
        message = line.strip()
        if message == RESET_WORD:
            talk.reset()
            continue
        if not message:
            continue
        reply = talk.say(message, streamer=text_streamer(tokenizer) if stream and printing else None)
        if printing and not stream:
            print(reply.text, flush=True)
        turns.append({"user": message, "assistant": reply.text, "read_tokens": reply.read_tokens,
                      "new_tokens": reply.new_tokens, "seconds": round(reply.seconds, 3),
                      "reused_state": reply.reused_state})
    return {"model": model, "turns": turns, "state_bytes": reply.state_bytes if turns else 0}
