"""`t2r <command>`: each command is a plain typed function in `t2r.cli` (models.py, training.py, evaluation.py); its signature and docstring are the
command line (positional parameters become arguments, keyword-only ones `--flags`, `Args:` lines their help)."""

from __future__ import annotations

import argparse
import inspect
import json
import logging
import os
import sys
import types
import typing

from ..errors import T2RError
from .evaluation import bench, eval, lm_eval
from .models import convert, generate, verify
from .render import render
from .training import data, demo, distill, finetune, pipeline

EXIT_USAGE = 2
COMMANDS = [convert, generate, verify, data, distill, finetune, eval, lm_eval, pipeline, bench, demo]


def _param_help(doc: str) -> dict[str, str]:
    """Parse the `Args:` block of a Google-style docstring into {name: help}."""
    helps, current, in_args = {}, None, False
    for line in doc.splitlines():
        stripped = line.strip()
        if stripped == "Args:":
            in_args = True
            continue
        if not in_args:
            continue
        if not stripped:
            break
        name, sep, text = stripped.partition(":")
        if sep and name.isidentifier() and line.startswith("    ") and not line.startswith("     "):
            current = name
            helps[current] = text.strip()
        elif current:
            helps[current] += " " + stripped
    return helps


def _base_type(annotation):
    """`int | None` -> (int, True); `str` -> (str, False)."""
    hints = typing.get_args(annotation) if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union else ()
    if hints:
        non_none = [h for h in hints if h is not type(None)]
        return non_none[0], True
    return annotation, False


def _add_command(sub, fn) -> None:
    doc = inspect.getdoc(fn) or ""
    summary = doc.split("\n\n")[0]
    parser = sub.add_parser(fn.__name__.replace("_", "-"), help=summary, description=doc.split("Args:")[0].strip(),
                            formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    helps = _param_help(doc)
    hints = typing.get_type_hints(fn)
    for name, param in inspect.signature(fn).parameters.items():
        kind, optional = _base_type(hints.get(name, str))
        has_default = param.default is not inspect.Parameter.empty
        help_text = helps.get(name, "")
        if param.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD:
            parser.add_argument(name, type=kind, nargs="?" if has_default else None,
                                default=param.default if has_default else None, help=help_text)
        elif kind is bool:
            parser.add_argument(f"--{name.replace('_', '-')}", dest=name, action=argparse.BooleanOptionalAction,
                                default=param.default, help=help_text)
        else:
            parser.add_argument(f"--{name.replace('_', '-')}", dest=name, type=kind, metavar=name.upper(),
                                default=param.default if has_default else None, required=not has_default,
                                help=help_text)
    parser.set_defaults(_fn=fn)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="t2r", description="Turn a pretrained transformer LM into an RNN.")
    parser.add_argument("-q", "--quiet", action="store_true", help="only print results and errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for fn in COMMANDS:
        _add_command(sub, fn)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # under torchrun / `accelerate launch` every process runs this; only the first one reports
    follower = int(os.environ.get("RANK", "0") or 0) > 0
    logging.basicConfig(level=logging.WARNING if args.quiet or follower else logging.INFO, format="t2r: %(message)s",
                        stream=sys.stderr)
    for noisy in ("httpx", "urllib3", "filelock", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    kwargs = {k: v for k, v in vars(args).items() if k not in ("_fn", "command", "quiet")}
    fn = args._fn
    try:
        result = fn(**kwargs)
    except (T2RError, ValueError) as err:
        print(f"t2r {args.command}: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"t2r {args.command}: interrupted; nothing was left half-written", file=sys.stderr)
        return 130
    if not follower:
        print(json.dumps(result, indent=2) if kwargs.get("json") else render(args.command, result))
    return int(result.get("exit_code", 0)) if isinstance(result, dict) else 0


if __name__ == "__main__":
    sys.exit(main())
