"""`t2r <command>`: each command is a plain typed function `<command>_command` in `t2r.cli` (models.py, training.py,
evaluation.py); its signature and docstring are the command line. Positional parameters become arguments, keyword-only
ones `--flags` (their `Args:` lines the help; `as_json` is `--json`), a parameter typed with a settings model
(`options: DistillSettings`) one `--flag` per field of the model (help from the field's description), and
`**overrides` every other `--key.path VALUE` pair (the pipeline's recipe overrides).

Every error a user can fix (a bad flag value, an unknown flag, a file that is not there) ends in one line
`t2r <command>: error: ...` on stderr and exit code 2; nothing is half-written."""

from __future__ import annotations

import argparse
import inspect
import json
import logging
import os
import sys
import types
import typing

from .. import __version__
from ..errors import T2RError
from ..settings import flag, model_in
from .chat import chat_command
from .evaluation import bench_command, eval_command, lm_eval_command
from .export import export_command
from .models import convert_command, generate_command, verify_command
from .recall import recall_command
from .render import render
from .training import data_command, demo_command, distill_command, finetune_command, pipeline_command
from .translation import translate_command

EXIT_USAGE = 2
COMMANDS = [convert_command, generate_command, chat_command, verify_command, data_command, distill_command,
            finetune_command, eval_command, lm_eval_command, recall_command, pipeline_command, bench_command, demo_command,
            export_command, translate_command]
FLAG_NAMES = {"as_json": "json"}  # parameters named so as not to shadow a module, keeping the flag users know


def command_name(fn) -> str:
    """`lm_eval_command` -> "lm-eval"."""
    return fn.__name__.removesuffix("_command").replace("_", "-")


def flag_of(name: str) -> str:
    """The command-line flag of a keyword-only parameter: `max_new_tokens` -> --max-new-tokens, `as_json` -> --json."""
    return "--" + FLAG_NAMES.get(name, name).replace("_", "-")


class _Parser(argparse.ArgumentParser):
    """argparse's own errors (a value that is not a number, a missing argument) in one line, like every other."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


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
    union = isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union
    hints = typing.get_args(annotation) if union else ()
    if hints:
        non_none = [h for h in hints if h is not type(None)]
        return non_none[0], True
    return annotation, False


def _add_settings(parser: argparse.ArgumentParser, model, description: str) -> None:
    """One --flag per field of the settings `model`; values stay strings until the model validates them all."""
    group = parser.add_argument_group(model.__name__, description)
    for name, field in model.model_fields.items():
        shown = field.get_default(call_default_factory=True)
        text = f"{field.description or ''} (default: {shown})".replace("%", "%%")
        if _base_type(field.annotation)[0] is bool:
            group.add_argument(flag([name]), dest=name, action=argparse.BooleanOptionalAction,
                               default=argparse.SUPPRESS, help=text)
        else:
            group.add_argument(flag([name]), dest=name, metavar=name.upper(), default=argparse.SUPPRESS, help=text)


def _add_parameter(parser: argparse.ArgumentParser, name: str, param: inspect.Parameter, annotation,
                   help_text: str) -> None:
    kind, _ = _base_type(annotation)
    has_default = param.default is not inspect.Parameter.empty
    if param.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD:
        parser.add_argument(name, type=kind, nargs="?" if has_default else None,
                            default=param.default if has_default else None, help=help_text)
    elif kind is bool:
        parser.add_argument(flag_of(name), dest=name, action=argparse.BooleanOptionalAction, default=param.default,
                            help=help_text)
    else:
        parser.add_argument(flag_of(name), dest=name, type=kind, metavar=FLAG_NAMES.get(name, name).upper(),
                            default=param.default if has_default else None, required=not has_default,
                            help=help_text)


def _add_command(sub, fn) -> None:
    doc = inspect.getdoc(fn) or ""
    parser = sub.add_parser(command_name(fn), help=doc.split("\n\n")[0], description=doc.split("Args:")[0].strip(),
                            formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    helps, hints = _param_help(doc), typing.get_type_hints(fn)
    for name, param in inspect.signature(fn).parameters.items():
        model = model_in(hints.get(name))
        if param.kind is inspect.Parameter.VAR_KEYWORD:
            parser.epilog = f"--KEY.PATH VALUE: {helps.get(name, '')}"
        elif model is not None:
            _add_settings(parser, model, helps.get(name, ""))
        else:
            _add_parameter(parser, name, param, hints.get(name, str), helps.get(name, ""))
    parser.set_defaults(_fn=fn)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="t2r", description="Turn a pretrained transformer LM into an RNN.")
    parser.add_argument("-q", "--quiet", action="store_true", help="only print results and errors")
    parser.add_argument("--version", action="version", version=f"t2r {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for fn in COMMANDS:
        _add_command(sub, fn)
    return parser


def _pairs(extra: list[str]) -> dict[str, str]:
    """["--distill.tokens", "4k", "--eval.max_blocks=2"] -> {"distill.tokens": "4k", "eval.max_blocks": "2"}."""
    pairs, rest = {}, list(extra)
    while rest:
        arg = rest.pop(0)
        if not arg.startswith("--") or len(arg) == 2:
            raise T2RError(f"unrecognized argument {arg!r}: give recipe settings as --KEY.PATH VALUE")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if not rest or rest[0].startswith("--"):
                raise T2RError(f"--{key} needs a value")
            value = rest.pop(0)
        pairs[key] = value
    return pairs


def call_arguments(fn, values: dict, extra: list[str] = ()) -> dict:
    """The keyword arguments of `fn` from parsed flags: the fields of a settings model gathered into the model
    (validated: an error names the flag), the remaining `--key value` pairs into `**overrides` if `fn` takes them."""
    kwargs, hints, extra = {}, typing.get_type_hints(fn), list(extra)
    for name, param in inspect.signature(fn).parameters.items():
        model = model_in(hints.get(name))
        if param.kind is inspect.Parameter.VAR_KEYWORD:
            kwargs.update(_pairs(extra))
            extra = []
        elif model is not None:
            kwargs[name] = model.parse({f: values[f] for f in model.model_fields if f in values}, flag)
        elif name in values:
            kwargs[name] = values[name]
    if extra:
        raise T2RError(f"unrecognized arguments: {' '.join(extra)}")
    return kwargs


def main(argv: list[str] | None = None) -> int:
    args, extra = build_parser().parse_known_args(argv)
    # under torchrun / `accelerate launch` every process runs this; only the first one reports
    follower = int(os.environ.get("RANK", "0") or 0) > 0
    logging.basicConfig(level=logging.WARNING if args.quiet or follower else logging.INFO, format="t2r: %(message)s",
                        stream=sys.stderr)
    for noisy in ("httpx", "urllib3", "filelock", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if args.quiet:  # transformers' bars too (loading, saving): read when it is imported, after this
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("TQDM_DISABLE", "1")  # the bars transformers draws with tqdm itself (GGUF loading)
    fn = args._fn
    try:
        if hasattr(fn, "check_first"):  # what can be refused from the raw arguments alone, before settings import torch
            fn.check_first(vars(args))
        kwargs = call_arguments(fn, vars(args), extra)
        result = fn(**kwargs)
    except (T2RError, ValueError) as err:
        print(f"t2r {args.command}: error: {' '.join(str(err).split())}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as err:  # a file or folder the system refuses (read-only, full disk, permissions): the user's to fix
        where = f" ({err.filename})" if err.filename else ""
        print(f"t2r {args.command}: error: {err.strerror or err}{where}: check the path, its permissions and the free "
              "disk space", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"t2r {args.command}: interrupted; nothing was left half-written", file=sys.stderr)
        return 130
    if not follower:
        print(json.dumps(result, indent=2) if kwargs.get("as_json") else render(args.command, result))
    return int(result.get("exit_code", 0)) if isinstance(result, dict) else 0


if __name__ == "__main__":
    sys.exit(main())
