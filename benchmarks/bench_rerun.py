"""The persona demo, first run and cached rerun, in one sitting.

``persona_js_demo.py`` with its default parameters (SmolLM2-135M-Instruct, 6 personas x 6
questions x 48 tokens, 2 explained pairs) runs twice as ``python persona_js_demo.py`` in a
scratch copy of the repository's demo and data, against a fresh divscope cache: the first run
generates, teacher-forces, explains and reports; the rerun finds every generation, unit and
explanation in the cache. The packaged model's conversion from GGUF happens before either run
(it is timed and reported apart: a one-off per machine). Both runs must give identical matrices
and explanations, and the rerun must have taken every unit from the cache. The headline is
``rerun_ratio`` = rerun / first run (target: below 0.15); the machine's load average is
recorded next to it, since other work on the machine slows both runs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import machine_info, write_result

ROOT = Path(__file__).resolve().parents[1]
TARGET = 0.15


def _run(work: Path, env: dict[str, str]) -> tuple[float, Path]:
    """One ``python persona_js_demo.py`` run: its wall time and its run directory."""
    before = set((work / "eval_results").glob("*")) if (work / "eval_results").exists() else set()
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "persona_js_demo.py"], cwd=work, env=env, capture_output=True, text=True
    )
    elapsed = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    (run,) = set((work / "eval_results").glob("*")) - before
    return elapsed, run


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", default="benchmarks/results/persona_rerun.json")
    args = p.parse_args()

    from divscope.models.load import resolve_model

    t0 = time.perf_counter()
    model_dir = Path(resolve_model("smollm2-135m-instruct"))  # converted once, outside the runs
    convert_s = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        work, cache = Path(tmp) / "work", Path(tmp) / "cache"
        work.mkdir()
        shutil.copy(ROOT / "persona_js_demo.py", work)
        shutil.copytree(ROOT / "data", work / "data")  # links resolve: plain files here
        (cache / "models").mkdir(parents=True)
        (cache / "models" / model_dir.name).symlink_to(model_dir)
        env = dict(os.environ, DIVSCOPE_CACHE=str(cache), MPLBACKEND="Agg", HF_HUB_OFFLINE="1")
        load_before = os.getloadavg()
        first_s, first = _run(work, env)
        rerun_s, rerun = _run(work, env)
        load_after = os.getloadavg()
        meta = json.loads((rerun / "metadata.json").read_text())
        assert meta["units_from_cache"] == meta["units"], meta
        for name in ("divergence_matrices.json", "explain.json"):
            a, b = (json.loads((r / name).read_text()) for r in (first, rerun))
            if isinstance(a, dict):  # timings and dates differ, the numbers may not
                a.pop("metadata", None)
                b.pop("metadata", None)
            assert a == b, f"{name} differs between the first run and the rerun"
        explain_files = len(list(cache.glob("personas/*/explain_*.json")))
    result = {
        "first_run_s": first_s,
        "rerun_s": rerun_s,
        "rerun_ratio": rerun_s / first_s,
        "target_ratio": TARGET,
        "meets_target": rerun_s / first_s < TARGET,
        "model_conversion_s_before_the_runs": convert_s,
        "units": meta["units"],
        "explanations_cached": explain_files,
        "load_average_1_5_15_min": {"before": load_before, "after": load_after},
        "command": "python -m benchmarks.bench_rerun",
        "workload": "persona_js_demo.py defaults: smollm2-135m-instruct, 6 personas x 6 "
        "questions x 48 tokens, EXPLAIN_PAIRS = 2, cpu float32",
        "machine": machine_info(),
    }
    write_result(Path(args.out), result)
    print(json.dumps({k: v for k, v in result.items() if not isinstance(v, dict)}, indent=2))


if __name__ == "__main__":
    main()
