"""Run every benchmark (``make bench``); each writes its JSON under ``benchmarks/results/``.

Each benchmark runs in its own process, so peak-memory figures (RSS) are not disturbed by
what an earlier benchmark left in the allocator.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

RESULTS = Path("benchmarks/results")
BENCHES = (
    ("teacher_force", "bench_teacher_force", [], "teacher_force_float32.json"),
    (
        "teacher_force_bf16",
        "bench_teacher_force",
        ["--dtype", "bfloat16"],
        "teacher_force_bfloat16.json",
    ),
    ("ranking", "bench_ranking", [], "ranking.json"),
    ("intervals", "bench_intervals", [], "intervals.json"),
    ("diff", "bench_diff", [], "diff.json"),
    ("layers", "bench_layers", [], "layers.json"),
    ("losses", "bench_losses", [], "losses_memory.json"),
    ("ray", "bench_ray", [], "ray.json"),  # runs itself in a loopback-only network namespace
    ("persona_rerun", "bench_rerun", [], "persona_rerun.json"),
)


def main() -> None:
    for name, module, args, out in BENCHES:
        subprocess.run([sys.executable, "-m", f"benchmarks.{module}", *args], check=True)
        result = json.loads((RESULTS / out).read_text())
        headline = {k: v for k, v in result.items() if not isinstance(v, dict | list)}
        print(f"{name}: {json.dumps(headline)}", flush=True)


if __name__ == "__main__":
    main()
