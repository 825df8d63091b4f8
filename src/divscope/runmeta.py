"""Run directories, metadata records and atomic writes."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import sys
import tempfile
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO

import divscope


def atomic_write(path: Path, write: Callable[[BinaryIO], None], *, overwrite: bool = False) -> Path:
    """Call ``write`` on a temporary file next to ``path``, fsync, then rename it to ``path``.

    Raises:
        FileExistsError: ``path`` exists and ``overwrite`` is False (nothing is written).
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; not overwriting it (choose another path)")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # mkstemp's 0600 would make results private by accident
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: Path, text: str, *, overwrite: bool = False) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically (see :func:`atomic_write`)."""
    return atomic_write(path, lambda f: f.write(text.encode("utf-8")), overwrite=overwrite)


def atomic_write_json(path: Path, obj: Any, *, overwrite: bool = False) -> Path:
    """Write ``obj`` as indented JSON, atomically (see :func:`atomic_write_text`)."""
    return atomic_write_text(
        path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n", overwrite=overwrite
    )


def git_commit(cwd: Path | None = None, ignore: tuple[str, ...] = ()) -> str | None:
    """The current git commit (with ``-dirty`` when tracked files have changes), or None.

    ``ignore``: paths from the repository root whose changes do not count as dirty.
    """
    try:
        cwd = cwd or Path.cwd()
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            [
                "git",
                "status",
                "--porcelain",
                "--untracked-files=no",
                "--",
                ":/",
                *(f":(top,exclude){p}" for p in ignore),
            ],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def device_info() -> dict[str, Any]:
    """What the run ran on: platform, CPU count and, if torch is already imported, CUDA."""
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "cpu_count": os.cpu_count(),
    }
    torch = sys.modules.get("torch")
    if torch is not None:
        info["torch"] = torch.__version__
        info["cuda"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return info


def run_metadata(kind: str, parameters: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """A metadata record: what ran, with which parameters, version, commit, device, time."""
    return {
        "kind": kind,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "divscope_version": divscope.__version__,
        "git_commit": git_commit(),
        "device": device_info(),
        "parameters": parameters,
        **extra,
    }


def new_run_name(prefix: str) -> str:
    """``<prefix>_<UTC timestamp>``, unique to the second."""
    return f"{prefix}_{datetime.now(UTC).strftime('%Y%m%d_%H%M%S')}"


def new_run_dir(base: Path, prefix: str) -> Path:
    """Create a fresh ``base/<prefix>_<timestamp>[_n]`` directory; never reuses one."""
    name = new_run_name(prefix)
    for n in range(1000):
        d = Path(base) / (name if n == 0 else f"{name}_{n}")
        try:
            d.mkdir(parents=True, exist_ok=False)
            return d
        except FileExistsError:
            continue
    raise RuntimeError(f"could not create a fresh run directory under {base}")


def content_hash(obj: Any) -> str:
    """A short, stable hash of a JSON-able object (the cache's content address)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:24]


_FORMULA = ("=", "+", "-", "@", "\t", "\r")


def csv_text(header: list[str], rows: list[list[Any]]) -> str:
    """CSV with proper quoting; a text cell that a spreadsheet would run as a formula (starts
    with ``= + - @``, tab or CR) gets a leading ``'`` (:func:`read_csv` takes it off again).
    Numbers are written as their shortest round-trip repr."""
    import csv
    import io

    def cell(v: Any) -> Any:
        if isinstance(v, str) and v.startswith(_FORMULA):
            return "'" + v
        return repr(v) if isinstance(v, float) else v

    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows([cell(v) for v in row] for row in rows)
    return buf.getvalue()


def read_csv(path: Path) -> list[dict[str, str]]:
    """Rows of a CSV written by :func:`csv_text` (formula guards removed)."""
    import csv

    def cell(v: str) -> str:
        return v[1:] if v.startswith("'") and v[1:].startswith(_FORMULA) else v

    with Path(path).open(newline="", encoding="utf-8") as f:
        return [{k: cell(v) for k, v in row.items()} for row in csv.DictReader(f)]
