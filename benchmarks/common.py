"""Shared helpers for benchmarks: machine info and result files."""

from __future__ import annotations

import json
import os
import platform
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from divscope.runmeta import atomic_write_text, git_commit


def machine_info() -> dict[str, Any]:
    """CPU, core count, Python/NumPy/torch versions and the commit benchmarked."""
    import numpy as np

    info: dict[str, Any] = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "git_commit": git_commit(),
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


def write_result(path: Path, result: dict[str, Any]) -> Path:
    """Write a benchmark result (headline figures at the top level) as JSON."""
    return atomic_write_text(path, json.dumps(result, indent=2) + "\n", overwrite=True)
