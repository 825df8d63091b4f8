"""Executors: map a pipeline's units of work over workers, in this process or on Ray.

``executors`` (the interface, the in-process executor, the choice from ``--ray`` /
``--workers``) -> ``ray_pool`` (Ray actors that each load the model once; units retried when a
worker dies; imported only when Ray is asked for) ; ``netns`` runs a command in a private
network namespace with only loopback (how the tests and benchmarks start a local Ray here).
"""

from divscope.execution.executors import Executor, ExecutorError, InProcess, make_executor

__all__ = ["Executor", "ExecutorError", "InProcess", "make_executor"]
