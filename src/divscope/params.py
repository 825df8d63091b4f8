"""The demos' parameter cells, checked: a bad value is one line that names the parameter, the
value and what would work, in a script and in a notebook cell, never a traceback.

A demo calls :func:`one_line_errors` once, checks its parameters with the ``check_*``
functions before any work, and wraps each step that reads a parameter's input in
:func:`parameter`, which turns the engine's input errors (a broken sample file, an unknown
model, a metric the data cannot support, ...) into a :class:`ParameterError` naming it.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import Any

from divscope.diff.conditions import DiffInputError, parse_spec
from divscope.diff.layer_options import causal_blocks_problem
from divscope.execution.executors import ExecutorError
from divscope.models.chat import TemplateSeamError
from divscope.models.checks import is_integer
from divscope.models.load import (
    PACKAGED,
    DeviceError,
    ModelNotFoundError,
    available_devices,
    device_problem,
    model_problem,
)
from divscope.personas.data import PersonaDataError
from divscope.runmeta import OutputError, folder_problem
from divscope.samples.errors import SampleFileError
from divscope.sampling.config import ConfigError
from divscope.stats.analysis import AnalysisInputError

# errors the engine raises for bad input: each message already names the input and the fix
INPUT_ERRORS: tuple[type[Exception], ...] = (
    SampleFileError,
    PersonaDataError,
    ModelNotFoundError,
    DeviceError,
    DiffInputError,
    ConfigError,
    TemplateSeamError,
    AnalysisInputError,
    ExecutorError,
    OutputError,
)


class ParameterError(ValueError):
    """A parameter whose value cannot work: ``NAME = value: problem (valid: choices)``."""

    def __init__(self, name: str, value: Any, problem: str, valid: str | None = None) -> None:
        self.name, self.value = name, value
        super().__init__(f"{name} = {value!r}: {problem}" + (f" (valid: {valid})" if valid else ""))

    def _render_traceback_(self) -> list[str]:
        """What IPython shows for this error in a notebook cell: the one line, no traceback."""
        return [f"ParameterError: {self}"]


def one_line_errors(prog: str) -> None:
    """Show a :class:`ParameterError` or an engine input error as one line, no traceback:
    ``prog: error: ...`` on stderr in a plain ``python demo.py`` run (exit status 1), and
    ``ParameterError: ...`` (or the error's name) in a notebook cell."""
    shell = _ipython()
    if shell is not None:
        shell.set_custom_exc((ParameterError, *INPUT_ERRORS), _one_line_in_ipython)
        return
    previous = sys.excepthook

    def hook(kind: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
        if isinstance(exc, (ParameterError, *INPUT_ERRORS)):
            print(f"{prog}: error: {exc}", file=sys.stderr)
        else:
            previous(kind, exc, tb)

    sys.excepthook = hook


def _ipython() -> Any:
    """The running IPython shell, or None in a plain Python run."""
    ipython = sys.modules.get("IPython")
    return ipython.get_ipython() if ipython is not None else None


def _one_line_in_ipython(
    shell: Any, kind: type[BaseException], exc: BaseException, tb: Any, tb_offset: Any = None
) -> list[str]:
    """IPython's custom exception handler: the error's name and message, one line."""
    lines = [f"{kind.__name__}: {exc}"]
    shell._showtraceback(kind, exc, lines)
    return lines


@contextmanager
def parameter(name: str, value: Any) -> Iterator[None]:
    """Engine input errors raised inside become a :class:`ParameterError` naming ``name``."""
    try:
        yield
    except INPUT_ERRORS as e:
        about_another_file = isinstance(e, SampleFileError) and e.path != str(value)
        problem = f"{e.problem}. Fix: {e.fix}" if about_another_file else str(e)  # type: ignore[attr-defined]
        raise ParameterError(name, value, problem) from None


def check_choice(name: str, value: Any, choices: Sequence[Any], why: str = "") -> None:
    """``value`` must be one of ``choices`` (``why`` adds a hint)."""
    if value not in choices:
        problem = "not a valid choice" + (f"; {why}" if why else "")
        raise ParameterError(name, value, problem, ", ".join(map(repr, choices)))


def check_int(
    name: str,
    value: Any,
    *,
    minimum: int = 1,
    maximum: int | None = None,
    none: bool = False,
    why: str = "out of range",
) -> None:
    """``value`` must be an integer in ``[minimum, maximum]`` (or None when ``none``);
    ``why`` says what bounds it."""
    if value is None and none:
        return
    valid = f"an integer >= {minimum}" if maximum is None else f"{minimum} to {maximum}"
    valid += " or None" if none else ""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ParameterError(name, value, "not an integer", valid)
    if value < minimum or (maximum is not None and value > maximum):
        raise ParameterError(name, value, why, valid)


def check_causal_blocks(name: str, value: Any) -> None:
    """``value`` must be a number of leading blocks for ``--layers``' causal check: an integer
    >= 0 or ``"all"``."""
    if causal_blocks_problem(value):
        why = "out of range" if is_integer(value) else "not an integer or 'all'"
        raise ParameterError(name, value, why, "an integer >= 0 or 'all'")


def check_indices(name: str, value: Any) -> None:
    """``value`` must be None or a non-empty list of integers >= 0 (the model's own upper
    bound is checked where it loads)."""
    ok = value is None or (
        isinstance(value, list | tuple) and len(value) > 0
        and all(is_integer(v) and v >= 0 for v in value)
    )  # fmt: skip
    if not ok:
        raise ParameterError(name, value, "not a list of indices", "None or e.g. [8, 15, 22, 30]")


def check_number(name: str, value: Any, *, minimum: float = 0.0) -> None:
    """``value`` must be a finite number >= ``minimum``."""
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    if not ok or not (minimum <= value < float("inf")):
        raise ParameterError(name, value, "out of range", f"a number >= {minimum}")


def check_path(name: str, value: Any, *, none: bool = False, directory: bool = False) -> None:
    """``value`` must name an existing file (or directory, when ``directory``)."""
    if value is None and none:
        return
    if not isinstance(value, str | Path):
        raise ParameterError(name, value, "not a path", "a path" + (" or None" if none else ""))
    p = Path(value)
    if not p.exists():
        raise ParameterError(name, value, f"no such file (looked in {Path.cwd()})")
    if p.is_dir() and not directory:
        raise ParameterError(name, value, "a directory, not a file")


def check_model(name: str, value: Any) -> None:
    """``value`` must name a model that can load here (see
    :func:`divscope.models.load.model_problem`); a diff spec's options are checked too."""
    if not isinstance(value, str) or not value.strip():
        raise ParameterError(name, value, "not a model name", ", ".join(PACKAGED))
    with parameter(name, value):
        model = parse_spec(value).model if "," in value else value
    why = model_problem(model)
    if why is not None:
        raise ParameterError(name, value, f"model {model!r}: {why}")


def check_backend(name: str, value: Any) -> None:
    """``value`` must be a generation backend that is installed: ``hf`` or ``vllm``."""
    check_choice(name, value, ("hf", "vllm"))
    if value == "vllm" and importlib.util.find_spec("vllm") is None:
        raise ParameterError(
            name, value, "vllm is not installed. Fix: pip install 'divscope[vllm]' (GPU)", "'hf'"
        )


def check_device(name: str, value: Any) -> None:
    """``value`` must be a device this machine's torch can use."""
    why = device_problem(str(value))
    if why is not None:
        raise ParameterError(name, value, why, ", ".join(map(repr, available_devices())))


SEED_MAX = 2**63 - 1  # torch's generator seeds are 64-bit; each batch adds its offset


def check_seed(name: str, value: Any) -> None:
    """``value`` must be a seed numpy and torch both take: an integer 0 to 2**63 - 1."""
    check_int(name, value, minimum=0, maximum=SEED_MAX, why="not a 64-bit seed")


def check_output_dir(name: str, value: Any) -> None:
    """``value`` must name a folder that exists or can be made, and may be written into
    (checked before any work, so a run never fails at its end for want of a place)."""
    if not isinstance(value, str | Path) or not str(value).strip():
        raise ParameterError(name, value, "not a folder path", "a path")
    problem = folder_problem(value)
    if problem is not None:
        raise ParameterError(name, value, problem, "a folder you may write into")


def check_workers(name: str, value: Any, ray_name: str, ray: Any) -> None:
    """``value`` Ray workers with the Ray address ``ray`` (named ``ray_name``): at least 1,
    more than 1 only with Ray, and Ray installed when asked for."""
    if ray is not None and (not isinstance(ray, str) or not ray.strip()):
        raise ParameterError(ray_name, ray, "not an address", "None, 'local' or 'host:6379'")
    check_int(name, value)
    if value > 1 and ray is None:
        raise ParameterError(name, value, f"more than 1 worker needs Ray: set {ray_name}", "1")
    if ray is not None and importlib.util.find_spec("ray") is None:
        raise ParameterError(
            ray_name, ray, "Ray is not installed. Fix: pip install 'divscope[ray]'", "None"
        )


def check_run_prefix(name: str, value: Any) -> None:
    """``value`` must be a run-name prefix: one path component (runs are ``<prefix>_<time>``
    folders inside the output folder, never elsewhere)."""
    ok = isinstance(value, str) and value.strip() and value not in (".", "..")
    if not ok or "/" in value or "\\" in value or "\0" in value:
        raise ParameterError(name, value, "not a folder-name prefix", "a name without '/'")
