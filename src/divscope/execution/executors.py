"""Map units of work over workers: the interface, the in-process executor, the choice.

A pipeline hands an executor two picklable functions: ``load()`` builds what a worker keeps
(the model, loaded once) and ``work(state, unit)`` does one unit and returns a plain result
(numpy arrays, lists). :meth:`Executor.pool` gives a :class:`Pool` whose :meth:`Pool.map`
yields ``(key, result)`` as units finish, each key exactly once. The pipelines write results to
their content-addressed caches as they arrive and aggregate in key order, so the numbers do
not depend on which worker ran a unit or when it finished.

:class:`InProcess` (the default) runs units one after the other on the driver's own loaded
model, which is what divscope always did. :class:`divscope.execution.ray_pool.RayExecutor`
runs them on Ray actors, on this machine or on a cluster.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from typing import Any, Protocol

Units = Sequence[tuple[Hashable, Any]]


class ExecutorError(ValueError):
    """A bad executor choice (workers < 1, Ray asked for but not installed); names the fix."""


class Pool(Protocol):
    """Workers that hold a loaded state (a model) and run units on it."""

    def map(self, work: Callable[[Any, Any], Any], units: Units) -> Iterator[tuple[Hashable, Any]]:
        """Run ``work(state, unit)`` for every ``(key, unit)``; yield ``(key, result)`` as
        units finish (any order), every key exactly once."""
        ...


class Executor(Protocol):
    """Where units run. ``remote``: workers load their own model (the driver needs none)."""

    workers: int
    remote: bool

    @property
    def label(self) -> str:
        """A few words for progress bars and metadata: ``in-process``, ``ray x2``."""
        ...

    def pool(self, load: Callable[[], Any], local: Any = None) -> AbstractContextManager[Pool]:
        """Workers holding ``load()`` (an in-process pool uses ``local`` when given)."""
        ...

    def close(self) -> None:
        """Release what the executor started (a local Ray instance)."""
        ...

    def describe(self) -> dict[str, Any]:
        """The executor for run metadata."""
        ...


class _LocalPool:
    def __init__(self, load: Callable[[], Any], local: Any) -> None:
        self._load, self._state = load, local

    def map(self, work: Callable[[Any, Any], Any], units: Units) -> Iterator[tuple[Hashable, Any]]:
        for key, unit in units:
            if self._state is None:
                self._state = self._load()
            yield key, work(self._state, unit)


class InProcess:
    """Every unit in this process, one after the other, in the order given."""

    workers = 1
    remote = False
    label = "in-process"

    @contextmanager
    def pool(self, load: Callable[[], Any], local: Any = None) -> Iterator[Pool]:
        yield _LocalPool(load, local)

    def close(self) -> None:
        pass

    def describe(self) -> dict[str, Any]:
        return {"kind": "in-process", "workers": 1}


def make_executor(ray: str | None = None, workers: int = 1, *, device: str = "cpu") -> Executor:
    """The executor for ``--ray [ADDRESS]`` / ``--workers K``.

    Args:
        ray: None: in-process. ``"local"``: start a Ray instance on this machine. Anything
            else: the address of a running Ray cluster (``host:6379``, ``ray://host:10001``,
            ``auto``).
        workers: Ray actors, each with its own copy of the model (one GPU each on ``cuda``,
            otherwise an equal share of the CPUs).
        device: Where the workers run the model.

    Raises:
        ExecutorError: ``workers`` < 1, more than one worker without Ray, or Ray not installed.
    """
    if workers < 1:
        raise ExecutorError(f"--workers {workers}: must be at least 1")
    if ray is None:
        if workers > 1:
            raise ExecutorError(
                f"--workers {workers} needs Ray. Fix: add --ray (a local Ray instance) or "
                "--ray ADDRESS (a cluster)"
            )
        return InProcess()
    try:
        from divscope.execution.ray_pool import RayExecutor
    except ImportError as e:
        raise ExecutorError(
            "--ray needs the ray extra. Fix: pip install 'divscope[ray]'"
        ) from e
    return RayExecutor(ray, workers, device=device)


@contextmanager
def executor_for(
    executor: Executor | None, ray: str | None, workers: int, device: str
) -> Iterator[Executor]:
    """``executor`` as given (the caller closes it), or one made from ``ray`` / ``workers``
    and closed on exit."""
    if executor is not None:
        yield executor
        return
    made = make_executor(ray, workers, device=device)
    try:
        yield made
    finally:
        made.close()
