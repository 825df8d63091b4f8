"""Shared helpers for benchmarks: machine info, peak memory and result files."""

from __future__ import annotations

import json
import os
import platform
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from divscope.runmeta import atomic_write_text, git_commit

# each benchmark of a `make bench` run rewrites its result file before the next one starts:
# changes there do not make the benchmarked code dirty
RESULTS = "benchmarks/results"


def machine_info() -> dict[str, Any]:
    """CPU, core count, Python/NumPy/torch versions and the commit benchmarked."""
    import numpy as np

    info: dict[str, Any] = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "git_commit": git_commit(ignore=(RESULTS,)),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu_model"] = next(
                (ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), None
            )
    except OSError:
        pass
    return info


def synchronize(device: Any) -> None:
    """Wait for ``device``'s queued work (a no-op on CPU): bracket every GPU timing with it."""
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def write_result(path: Path, result: dict[str, Any]) -> Path:
    """Write a benchmark result (headline figures at the top level) as JSON."""
    return atomic_write_text(path, json.dumps(result, indent=2) + "\n", overwrite=True)


def status_mb(field: str) -> float:
    """A ``/proc/self/status`` memory field (``VmRSS``, ``VmHWM``) in MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field} line")


class PeakRSS:
    """Peak RSS above the start of a ``with`` block; ``extra_mb`` is set on exit.

    Resets the kernel's high-water mark (``/proc/self/clear_refs``, Linux >= 4.0) and reads
    it back (``VmHWM``) instead of sampling in a thread: a polling thread competes with the
    compute threads for the cores (on 2 cores it slowed the scorer by 5-10%).
    """

    def __enter__(self) -> PeakRSS:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        self.start = status_mb("VmRSS")
        return self

    def __exit__(self, *exc: object) -> None:
        self.extra_mb = status_mb("VmHWM") - self.start
