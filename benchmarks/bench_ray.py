"""Ray executor: what scoring persona units on Ray actors costs over doing it in-process.

Workload: the persona pipeline's unit of work (one question's responses teacher-forced under
every persona, :func:`divscope.personas.units.score_on`) on the real SmolLM2-135M: P personas
plus the noise-floor twin, Q questions (Q units), every persona answering every question with
T synthetic tokens (the cost does not depend on the content). The same units run

* in-process (:class:`divscope.execution.InProcess`), with torch's default threads (2 here)
  and with one;
* on Ray with 1 worker, with both CPUs (torch threads 2) and with one;
* on Ray with 2 workers (one CPU and one torch thread each).

Each executor is timed with its workers already holding the model (their start, Ray's start
and the model loads are reported apart), best of ``--reps`` passes, interleaved because the
machine is shared (and with Ray's workers at nice 0, not Ray's default 15, for the same
reason). Reported: seconds and units/s per executor; ``ray_overhead_ratio``: Ray with 1
worker / in-process at one torch thread each (the same compute, so the ratio is Ray's cost;
on a busy 2-core machine two-thread runs vary by 2x from run to run, so the two-thread ratio
is reported beside it); ``ray_units_per_s`` with 2 workers (on 2 cores two workers cannot beat
one); whether every executor returned bitwise the same numbers; the per-unit scheduling cost
(a no-op unit's round trip through a warm 1-worker pool).

A local Ray instance here must not touch the network: unless ``--no-namespace``, this module
re-runs itself in a private network namespace with only loopback
(:func:`divscope.execution.netns.loopback_command`).
"""

from __future__ import annotations

import argparse
import json
import operator
import os
import subprocess
import sys
import time
from contextlib import ExitStack
from functools import partial
from pathlib import Path

import numpy as np

from benchmarks.common import machine_info, write_result
from divscope.execution import InProcess
from divscope.execution.netns import MARKER, loopback_command, unshare_reason

MODEL = "smollm2-135m-instruct"
WORKLOAD = (4, 8, 32)  # personas (a twin is added), questions = units, response tokens
NOOP_UNITS = 200
NICENESS = "RAY_worker_niceness"  # Ray's (lower-case) setting for its workers' nice value
LOAD_AT_START = os.getloadavg()  # other jobs on the machine (shared)


def units(p: int, q: int, t: int):
    """The Q question units, with seeded random responses of ``t`` tokens."""
    from divscope.models.chat import PromptRenderer
    from divscope.models.load import load_model
    from divscope.personas.data import load_personas, load_questions
    from divscope.personas.units import QuestionUnit

    model, tok = load_model(MODEL)
    renderer = PromptRenderer(tok)
    personas = load_personas("data/personas/core.yaml", p)
    personas.append(personas[0])  # the twin
    rng = np.random.default_rng(0)
    out = []
    for i, question in enumerate(load_questions("data/questions/eval20.yaml", q)):
        prompts = [renderer.prompt_ids(x.prompt, question.text) for x in personas]
        responses = {g: rng.integers(0, 49152, t).tolist() for g in range(p)}
        out.append((i, QuestionUnit(prompts, responses, 0, [10, 20, 30])))
    return (model, tok), out


def timed_pass(pool, work, todo) -> tuple[float, dict]:
    t0 = time.perf_counter()
    got = dict(pool.map(work, todo))
    return time.perf_counter() - t0, got


def same(a: dict, b: dict) -> bool:
    """Bitwise the same scores (JS, both KLs, hidden states) for every unit."""
    for key in a:
        for g, u in a[key].items():
            v = b[key][g]
            if not all(
                np.array_equal(getattr(u, f), getattr(v, f))
                for f in ("js", "kl_fwd", "kl_rev", "hidden")
                if getattr(u, f) is not None
            ):
                return False
    return True


def measure(reps: int) -> dict:
    import ray
    import torch

    from divscope.execution.ray_pool import RayExecutor
    from divscope.personas.units import Scorer, load_scorer, score_on

    loaded, todo = units(*WORKLOAD)
    work = partial(score_on, persona_batch=8)
    load = partial(load_scorer, MODEL, "cpu", "float32")
    cores = os.cpu_count() or 1
    # Ray runs workers at nice 15; on a shared machine that measures the neighbours, not Ray
    os.environ.setdefault(NICENESS, "0")
    t0 = time.perf_counter()
    # logical CPUs for every pool at once; only one pool computes at a time
    ray.init(num_cpus=4 * cores, include_dashboard=False, _node_ip_address="127.0.0.1",
             log_to_driver=False)  # fmt: skip
    startup = {"ray_init": time.perf_counter() - t0}
    seconds: dict[str, float] = {}
    results: dict[str, dict] = {}
    threads = torch.get_num_threads()
    # name -> (workers, torch threads per worker); in-process: (0, threads)
    configs = {"in_process": (0, threads), "in_process_1_thread": (0, 1),
               "ray_1": (1, cores), "ray_1_1_thread": (1, 1), "ray_2": (2, cores // 2)}  # fmt: skip
    with ExitStack() as stack:
        local = stack.enter_context(InProcess().pool(load, Scorer(*loaded)))
        list(local.map(work, todo[:1]))  # warm-up (compiles the fused kernels)
        pools = {}
        for name, (k, per) in configs.items():
            if k == 0:
                pools[name] = local
                continue
            t0 = time.perf_counter()
            pools[name] = stack.enter_context(RayExecutor("local", k, cpus_per_worker=per).pool(load))
            list(pools[name].map(work, todo[:k]))  # workers start, load, warm up
            startup[f"{name}_workers_ready"] = time.perf_counter() - t0
        for _ in range(reps):  # interleaved: the machine is shared
            for name, pool in pools.items():
                torch.set_num_threads(configs[name][1] if pool is local else threads)
                sec, results[name] = timed_pass(pool, work, todo)
                seconds[name] = min(seconds.get(name, float("inf")), sec)
        torch.set_num_threads(threads)
        noop = stack.enter_context(RayExecutor("local", 1, cpus_per_worker=cores).pool(int))
        list(noop.map(operator.add, [(0, 0)]))
        t0 = time.perf_counter()
        list(noop.map(operator.add, [(i, i) for i in range(NOOP_UNITS)]))
        per_unit = (time.perf_counter() - t0) / NOOP_UNITS
    ray.shutdown()
    n = len(todo)
    ups = {k: n / s for k, s in seconds.items()}
    return {
        "ray_overhead_ratio": seconds["ray_1_1_thread"] / seconds["in_process_1_thread"],
        "ray_overhead_ratio_2_threads": seconds["ray_1"] / seconds["in_process"],
        "ray_units_per_s": ups["ray_2"],
        "ray_2_workers_speedup_vs_1": seconds["ray_1"] / seconds["ray_2"],
        "in_process_1_thread_speedup_vs_2": seconds["in_process"] / seconds["in_process_1_thread"],
        "ray_scheduling_seconds_per_unit": per_unit,
        "scheduling_share_of_a_unit": per_unit / (seconds["in_process_1_thread"] / n),
        "bitwise_equal_to_in_process": all(
            same(results["in_process"], results[k]) for k in configs if k != "in_process"
        ),
        "seconds": seconds,
        "units_per_s": ups,
        "threads_per_worker": {k: v[1] for k, v in configs.items()},
        "startup_seconds": startup,
        "workload": {
            "personas": WORKLOAD[0],
            "twin": True,
            "questions_units": WORKLOAD[1],
            "response_tokens": WORKLOAD[2],
            "responses_per_unit": WORKLOAD[0],
        },
        "reps": reps,
        "ray_worker_niceness": int(os.environ[NICENESS]),
        "load_average_at_start": list(LOAD_AT_START),
        "machine": machine_info(),
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--reps", type=int, default=2, help="best of this many (each executor)")
    ap.add_argument("--out", default="benchmarks/results/ray.json")
    ap.add_argument("--no-namespace", action="store_true",
                    help="start Ray here (not in a loopback-only network namespace)")  # fmt: skip
    args = ap.parse_args(argv)
    if not args.no_namespace and os.environ.get(MARKER) != "1":
        reason = unshare_reason()
        if reason:
            raise SystemExit(f"bench_ray: {reason}; pass --no-namespace where Ray may use the network")
        argv = [sys.executable, "-m", "benchmarks.bench_ray", *(sys.argv[1:] if argv is None else argv)]
        subprocess.run(loopback_command(argv), check=True)
        return json.loads(Path(args.out).read_text())
    result = measure(args.reps)
    write_result(Path(args.out), result)
    print(json.dumps({k: v for k, v in result.items() if not isinstance(v, dict | list)}))
    return result


if __name__ == "__main__":
    main()
