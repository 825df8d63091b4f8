"""The ``divscope`` command line: rank, sample, personas, diff, analyze, report, convert.

Each command is one module here with its parser builder (``add_parser(sub)``) and its handler
(``run(args)``) side by side; adding a command is a new module and one line in ``COMMANDS``.
"""

from __future__ import annotations

import argparse

from divscope import __version__
from divscope.cli import analyze, convert, diff, personas, rank, report, sample
from divscope.cli.common import Parser, no_library_progress_bars, run_handled
from divscope.cli.rank import format_ranking

__all__ = ["COMMANDS", "DESCRIPTION", "build_parser", "format_ranking", "main"]

DESCRIPTION = (
    "divscope: where do language-model output distributions differ? KL and JS between two "
    "models (ranked prompts) and between personas of one model, with the statistics and "
    "reports around them. Run 'divscope COMMAND --help' for a command's options."
)

# the commands in the order ``divscope --help`` lists them
COMMANDS = (rank, sample, personas, diff, analyze, report, convert)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for the docs and the tests)."""
    p = Parser(prog="divscope", description=DESCRIPTION)
    p.add_argument("--version", action="version", version=f"divscope {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=Parser)
    for module in COMMANDS:
        module.add_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``divscope`` console script; returns the exit code."""
    args = build_parser().parse_args(argv)
    if getattr(args, "quiet", False):
        no_library_progress_bars()
    return run_handled(args.func, args)
