"""What every command shares: the help formatter, argument types, options and error handling."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

from divscope.diff.conditions import DiffInputError
from divscope.execution.executors import ExecutorError
from divscope.models.chat import TemplateSeamError
from divscope.models.load import DeviceError, ModelNotFoundError
from divscope.personas.data import PersonaDataError
from divscope.report.html import ReportError
from divscope.runmeta import OutputError, output_error
from divscope.samples.errors import SampleFileError
from divscope.sampling.config import ConfigError
from divscope.stats.analysis import AnalysisInputError

# input mistakes each command reports as one line (exit 2)
INPUT_ERRORS = (
    SampleFileError,
    ConfigError,
    PersonaDataError,
    TemplateSeamError,
    AnalysisInputError,
    ReportError,
    DiffInputError,
    ModelNotFoundError,
    DeviceError,
    ExecutorError,
    OutputError,
)


class Formatter(argparse.HelpFormatter):
    """Help with each option's default, unless it has none or the help text gives it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if default is None or default is False or default == argparse.SUPPRESS:
            return text
        if "default" in text or not text:
            return text
        return f"{text} (default: {default})"


class Parser(argparse.ArgumentParser):
    """An argument parser with :class:`Formatter` unless told otherwise."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", Formatter)
        super().__init__(*args, **kwargs)


def at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer >= ``minimum`` (anything else is refused with a message)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum} (got {value})")
        return value

    parse.__name__ = f"integer >= {minimum}"
    return parse


POSITIVE = at_least(1)


def index_list(text: str) -> list[int]:
    """An argparse type: comma-separated integers >= 0 (``"8,15,22"``)."""
    try:
        values = [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a comma-separated list of integers (e.g. 8,15,22)"
        ) from None
    if any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: indices must be >= 0")
    return values


def command(sub: Any, name: str, help: str, **kwargs: Any) -> argparse.ArgumentParser:  # noqa: A002
    """A subcommand whose ``--help`` opens with its one-line summary (unless it has more)."""
    kwargs.setdefault("description", help[0].upper() + help[1:] + ".")
    return sub.add_parser(name, help=help, **kwargs)


def executor_options(p: argparse.ArgumentParser) -> None:
    """``--ray`` and ``--workers``, the options of the commands that run local-model units."""
    p.add_argument(
        "--ray",
        nargs="?",
        const="local",
        default=None,
        metavar="ADDRESS",
        help="run generation and scoring on Ray workers: a local Ray instance (no ADDRESS) or "
        "the cluster at ADDRESS (host:6379, ray://host:10001, auto); default: in this process",
    )
    p.add_argument(
        "--workers",
        type=POSITIVE,
        default=1,
        help="Ray workers, each with its own copy of the model: one GPU each with --device "
        "cuda, else an equal share of the CPUs",
    )


def no_library_progress_bars() -> None:
    """--quiet: transformers' "Loading weights" and the hub's download bars stay hidden too."""
    from huggingface_hub.utils import disable_progress_bars
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    disable_progress_bars()


def error(message: object) -> int:
    """Print ``divscope: error: MESSAGE`` on stderr; returns the exit code 2."""
    print(f"divscope: error: {message}", file=sys.stderr)
    return 2


def run_handled(func: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """Run a command's handler; a bad input or output is one line on stderr and exit 2."""
    try:
        return func(args)
    except INPUT_ERRORS as e:
        return error(e)
    except ConnectionError as e:  # ray.init could not reach --ray ADDRESS
        return error(f"{e}. Fix: check --ray ADDRESS")
    except FileExistsError as e:
        return error(f"{e}; pass --overwrite to replace it")
    except OSError as e:  # writing a run directory or an output: one line, not a traceback
        return error(output_error(None, e))
