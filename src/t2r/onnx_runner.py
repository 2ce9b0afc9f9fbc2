"""Generate from the graphs of `t2r export --onnx DIR` with onnxruntime and numpy only (no torch, no transformers):
greedy, batch 1, a constant-memory loop. The tokenizer is read with the `tokenizers` package when DIR has a
tokenizer.json; token ids work without it.

    python -m t2r.onnx_runner DIR --prompt "It is a truth" --max-new-tokens 32 [--int8]
    OnnxRNN(DIR).generate([ids...], max_new_tokens=32) -> [new ids...]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

CONFIG = "onnx_config.json"


class OnnxRNN:
    """The two graphs of an exported model and its state layout."""

    def __init__(self, directory: str | Path, *, int8: bool = False, threads: int = 1) -> None:
        import onnxruntime as ort

        self.dir = Path(directory)
        config_path = self.dir / CONFIG
        if not config_path.is_file():
            raise FileNotFoundError(f"{config_path} not found: write it with `t2r export --onnx {directory}`")
        self.config = json.loads(config_path.read_text())
        files = self.config["files"]
        suffix = "_int8" if int8 else ""
        if int8 and "step_int8" not in files:
            raise FileNotFoundError(f"{directory} has no int8 graphs: export with --onnx-int8")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        self.sessions = {g: ort.InferenceSession(str(self.dir / files[g + suffix]), options,
                                                 providers=["CPUExecutionProvider"]) for g in ("prefill", "step")}
        self.chunk = int(self.config["prefill_chunk"])

    def zero_state(self, batch: int = 1) -> list[np.ndarray]:
        return [np.zeros((batch, *s["shape"]), dtype=np.dtype(s["dtype"])) for s in self.config["states"]]

    def run(self, graph: str, ids: np.ndarray, start: int, state: list[np.ndarray]):
        """(logits [B, V], new state) of `ids` [B, T] at positions start.. through `graph`."""
        positions = np.broadcast_to(np.arange(start, start + ids.shape[1], dtype=np.int64), ids.shape)
        feed = {"input_ids": ids.astype(np.int64), "position_ids": np.ascontiguousarray(positions)}
        feed.update({s["name"]: t for s, t in zip(self.config["states"], state)})
        logits, *new = self.sessions[graph].run(None, feed)
        return logits, new

    def prefill(self, ids: list[int]):
        """(logits [1, V] after the prompt, state): P-token pieces through prefill.onnx, the rest one at a time."""
        if not ids:
            raise ValueError("the prompt is empty")
        tokens, state, at = np.asarray(ids, dtype=np.int64)[None], self.zero_state(1), 0
        while len(ids) - at >= self.chunk:
            logits, state = self.run("prefill", tokens[:, at:at + self.chunk], at, state)
            at += self.chunk
        while at < len(ids):
            logits, state = self.run("step", tokens[:, at:at + 1], at, state)
            at += 1
        return logits, state

    def generate(self, ids: list[int], *, max_new_tokens: int, eos_token_id: int | None = None) -> list[int]:
        """Greedy continuation of `ids`, stopping after `eos_token_id` (default: the exported model's)."""
        eos = self.config.get("eos_token_id") if eos_token_id is None else eos_token_id
        eos = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        logits, state = self.prefill(ids)
        out = []
        for i in range(max_new_tokens):
            token = int(logits[0].argmax())
            out.append(token)
            if token in eos or i == max_new_tokens - 1:
                break
            logits, state = self.run("step", np.array([[token]], dtype=np.int64), len(ids) + i, state)
        return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m t2r.onnx_runner", description=__doc__.splitlines()[0])
    parser.add_argument("directory")
    parser.add_argument("--prompt", default="It is a truth universally acknowledged")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--int8", action="store_true", help="run the int8 graphs (export with --onnx-int8)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    tokenizer_file = Path(args.directory) / "tokenizer.json"
    try:
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(str(tokenizer_file))
        runner = OnnxRNN(args.directory, int8=args.int8, threads=args.threads)
    except Exception as err:  # noqa: BLE001  (a missing file or package: one line for the user, no traceback)
        print(f"onnx_runner: error: {err}", file=sys.stderr)
        return 2
    ids = tokenizer.encode(args.prompt).ids
    new = runner.generate(ids, max_new_tokens=args.max_new_tokens)
    print(args.prompt + tokenizer.decode(new))
    return 0


if __name__ == "__main__":
    sys.exit(main())
