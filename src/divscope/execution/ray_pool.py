"""Units on Ray actors: each actor loads the model once and keeps it; a lost worker loses
nothing.

:class:`RayExecutor` starts (``"local"``) or joins (an address) a Ray instance. Its pools are K
actors (:class:`_Worker`): one GPU each when the device is CUDA, otherwise an equal share of the
CPUs with torch's thread count set to match. The driver keeps one unit in flight per worker
and hands the next unit to whichever worker finishes first. A worker that dies (its process
killed, its node lost) is restarted by Ray (``max_restarts``) and reloads the model; the unit it
held goes back to the front of the queue for the next free worker. A unit's result is yielded
once, the first time it arrives, so nothing is counted twice.

Ray is imported only here, and this module only when Ray is asked for.
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from collections.abc import Callable, Hashable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import ray
from ray.exceptions import (
    NodeDiedError,
    ObjectLostError,
    RayActorError,
    RayTaskError,
    WorkerCrashedError,
)

LOST = (RayActorError, WorkerCrashedError, NodeDiedError, ObjectLostError)
MAX_RESTARTS = 3  # per worker: Ray restarts a dead actor this often, then it is dropped
MAX_ATTEMPTS = 3  # per unit: a unit whose worker died this often is an error
Units = Sequence[tuple[Hashable, Any]]  # (key, unit) pairs, as in executors.Pool.map


class WorkersLostError(RuntimeError):
    """Units could not be finished: every worker is gone, or one unit lost too many workers."""


class _Worker:
    """A Ray actor's body: the state ``load()`` builds (the model), loaded on first use."""

    def __init__(self, load: Callable[[], Any], threads: int | None) -> None:
        self._load, self._threads, self._state = load, threads, None

    def setup(self) -> int:
        """Load the state if this process has none yet (also after a restart); the pid."""
        if self._state is None:
            if self._threads:
                import torch

                torch.set_num_threads(self._threads)
            self._state = self._load()
        return os.getpid()

    def run(self, work: Callable[[Any, Any], Any], unit: Any) -> Any:
        self.setup()
        return work(self._state, unit)


def _cause(e: RayTaskError) -> BaseException:
    """The exception a unit raised in its worker (a divscope error keeps its one-line message)."""
    cause = getattr(e, "cause", None)
    return cause if isinstance(cause, BaseException) else e


class RayExecutor:
    """Units on K Ray actors (see the module doc).

    Attributes:
        address: ``"local"`` (start Ray here) or a cluster address.
        workers: Actors per pool.
        cpus_per_worker: CPUs (and torch threads) per actor on CPU; default an equal share
            of the cluster's CPUs, at most one node's.
        pids: Worker index -> process id, as last reported (it changes after a restart).
        in_flight: Worker index -> ``(key, work function name)`` of the unit it holds.
        retried: Keys of units that went back to the queue because their worker died.
    """

    remote = True

    def __init__(
        self,
        address: str = "local",
        workers: int = 1,
        *,
        device: str = "cpu",
        cpus_per_worker: int | None = None,
        init_kwargs: dict[str, Any] | None = None,
    ) -> None:
        self.address, self.workers, self.device = address, workers, device
        self.cpus_per_worker = cpus_per_worker
        self.init_kwargs = init_kwargs or {}
        self.pids: dict[int, int] = {}
        self.in_flight: dict[int, tuple[Hashable, str]] = {}
        self.retried: list[Hashable] = []
        self._started = False

    @property
    def label(self) -> str:
        return f"ray x{self.workers}"

    def describe(self) -> dict[str, Any]:
        return {
            "kind": "ray",
            "address": self.address,
            "workers": self.workers,
            "retried_units": len(self.retried),
        }

    def start(self) -> None:
        """Start or join Ray (once). A local start binds 127.0.0.1, without the dashboard."""
        if ray.is_initialized():
            return
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        kwargs: dict[str, Any] = {"log_to_driver": False, "logging_level": logging.WARNING}
        if self.address == "local":
            kwargs |= {"include_dashboard": False, "_node_ip_address": "127.0.0.1"}
        ray.init(address=self.address, **(kwargs | self.init_kwargs))
        self._started = True

    def close(self) -> None:
        """Shut Ray down if this executor started it."""
        if self._started:
            ray.shutdown()
            self._started = False

    def _resources(self) -> tuple[float, float, int | None]:
        """(CPUs, GPUs, torch threads) per actor."""
        if self.device.startswith("cuda"):
            return 1, 1, None
        if self.cpus_per_worker:
            return self.cpus_per_worker, 0, self.cpus_per_worker
        per_node = max(n["Resources"].get("CPU", 0) for n in ray.nodes() if n["Alive"])
        total = ray.cluster_resources().get("CPU", 1)
        cpus = max(1, min(int(total // self.workers), int(per_node)))
        return cpus, 0, cpus

    @contextmanager
    def pool(self, load: Callable[[], Any], local: Any = None) -> Iterator[_RayPool]:
        """K actors holding ``load()``, started on the first unit; killed on exit."""
        pool = _RayPool(self, load)
        try:
            yield pool
        finally:
            pool.shutdown()


class _RayPool:
    def __init__(self, ex: RayExecutor, load: Callable[[], Any]) -> None:
        self.ex, self.load = ex, load
        self.actors: list[Any] = []

    def _start(self) -> None:
        if self.actors:
            return
        self.ex.start()
        cpus, gpus, threads = self.ex._resources()
        cls = ray.remote(_Worker).options(
            num_cpus=cpus, num_gpus=gpus, max_restarts=MAX_RESTARTS, max_task_retries=0
        )
        self.actors = [cls.remote(self.load, threads) for _ in range(self.ex.workers)]
        try:
            pids = ray.get([a.setup.remote() for a in self.actors])
        except RayTaskError as e:
            raise _cause(e) from None
        self.ex.pids = dict(enumerate(pids))

    def shutdown(self) -> None:
        for a in self.actors:
            ray.kill(a, no_restart=True)
        self.actors = []
        self.ex.in_flight.clear()

    def map(self, work: Callable[[Any, Any], Any], units: Units) -> Iterator[tuple[Hashable, Any]]:
        queue = deque(units)
        if not queue:
            return
        self._start()
        run = _Run(self.ex, self.actors, work, queue)
        while run.queue or run.running:
            run.dispatch()
            (ref,), _ = ray.wait([*run.running, *run.pinging], num_returns=1)
            if ref in run.pinging:
                run.checked(ref)
            elif (got := run.finished(ref)) is not None:
                yield got


class _Run:
    """One :meth:`_RayPool.map`: the queue, the units in flight, the workers being checked."""

    def __init__(self, ex: RayExecutor, actors: list[Any], work: Callable, queue: deque) -> None:
        self.ex, self.actors, self.work, self.queue = ex, actors, work, queue
        self.name = getattr(getattr(work, "func", work), "__name__", "work")
        self.idle = deque(range(len(actors)))
        self.running: dict[Any, tuple[int, Hashable, Any]] = {}  # ref -> (worker, key, unit)
        self.pinging: dict[Any, int] = {}  # ref of a health check -> worker
        self.failures = dict.fromkeys(range(len(actors)), 0)
        self.attempts: dict[Hashable, int] = {}
        self.done: set[Hashable] = set()

    def dispatch(self) -> None:
        """One unit to every idle worker while units are queued."""
        while self.queue and self.idle:
            w = self.idle.popleft()
            key, unit = self.queue.popleft()
            self.running[self.actors[w].run.remote(self.work, unit)] = (w, key, unit)
            self.ex.in_flight[w] = (key, self.name)
        if not self.running and not self.pinging:
            raise WorkersLostError(f"every Ray worker is gone; {len(self.queue)} units left")

    def check(self, w: int) -> None:
        """Ask worker ``w`` to (re)load its state: back in the pool once it answers."""
        self.pinging[self.actors[w].setup.remote()] = w

    def checked(self, ref: Any) -> None:
        w = self.pinging.pop(ref)
        try:
            self.ex.pids[w] = ray.get(ref)
            self.idle.append(w)
        except RayTaskError as e:
            raise _cause(e) from None
        except LOST:
            self.failures[w] += 1
            if self.failures[w] <= MAX_RESTARTS:  # else the worker is dropped
                time.sleep(0.5)
                self.check(w)

    def finished(self, ref: Any) -> tuple[Hashable, Any] | None:
        """The unit's ``(key, result)``; None when its worker died (the unit is queued again)
        or the key was already yielded."""
        w, key, unit = self.running.pop(ref)
        self.ex.in_flight.pop(w, None)
        try:
            result = ray.get(ref)
        except RayTaskError as e:
            raise _cause(e) from None
        except LOST as e:
            self.attempts[key] = self.attempts.get(key, 0) + 1
            self.ex.retried.append(key)
            if self.attempts[key] >= MAX_ATTEMPTS:
                raise WorkersLostError(f"unit {key!r} lost its worker {MAX_ATTEMPTS} times") from e
            self.queue.appendleft((key, unit))
            self.check(w)
            return None
        self.idle.append(w)
        if key in self.done:
            return None
        self.done.add(key)
        return key, result
