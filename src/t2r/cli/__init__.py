"""The command line: `t2r <command>`. app.py builds argparse from the typed command functions of models.py,
training.py and evaluation.py; render.py turns their results into text."""

from .app import COMMANDS, build_parser, main

__all__ = ["COMMANDS", "build_parser", "main"]
