"""Run directories, metadata records and atomic writes."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import platform
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO

import divscope


class OutputError(Exception):
    """An output that cannot be written: names the path, the problem and the fix."""

    def __init__(self, path: Path | str, problem: str, fix: str) -> None:
        super().__init__(f"{path}: {problem}. Fix: {fix}")
        self.path, self.problem, self.fix = path, problem, fix


_KEPT = "completed work is kept; re-run after fixing it"
_OS_PROBLEMS = {
    errno.ENOSPC: ("the disk is full", f"free space or write elsewhere ({_KEPT})"),
    errno.EDQUOT: ("the disk quota is used up", f"free space or write elsewhere ({_KEPT})"),
    errno.EROFS: ("the file system is read-only", "write to a writable place"),
    errno.EACCES: ("permission denied", "write to a folder you may write to"),
    errno.EPERM: ("permission denied", "write to a folder you may write to"),
    errno.ENOTDIR: ("a parent of it is a file, not a folder", "choose another path"),
    errno.EEXIST: ("a parent of it is a file, not a folder", "choose another path"),
    errno.EISDIR: ("is a directory", "give a file path inside it"),
}


def output_error(path: Path | str | None, e: OSError) -> OutputError:
    """``e`` (raised while writing ``path``) as one clear :class:`OutputError`."""
    problem, fix = _OS_PROBLEMS.get(e.errno or 0, (e.strerror or str(e), "check the path"))
    return OutputError(path or e.filename or "<output>", problem, fix)


def check_writable(path: Path, *, overwrite: bool = False) -> None:
    """Refuse, before any work, an output that could not be written.

    Raises:
        FileExistsError: ``path`` exists and ``overwrite`` is False.
        OutputError: ``path`` is a directory, a parent is a file, or the place is not writable.
    """
    path = Path(path)
    if path.is_dir():
        raise OutputError(path, "is a directory", "give a file path (e.g. DIR/result.json)")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; not overwriting it (choose another path)")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise OutputError(path, f"{parent} is a file, not a folder", "choose another path")
    if not os.access(parent, os.W_OK | os.X_OK):
        e = OSError(errno.EROFS if _read_only(parent) else errno.EACCES, "not writable")
        raise output_error(path, e)


def folder_problem(path: Path | str, *, writable: bool = True) -> str | None:
    """Why ``path`` cannot be (or be created as) a folder to write into; None when it can.

    Nothing is created: the nearest existing of ``path`` and its parents must be a folder
    (and, with ``writable``, one this process may write into).
    """
    path = Path(path)
    first = next((p for p in (path, *path.parents) if p.exists()), None)
    if first is None:
        return None
    if not first.is_dir():
        return "is a file, not a folder" if first == path else f"{first} is a file, not a folder"
    if writable and not os.access(first, os.W_OK | os.X_OK):
        e = OSError(errno.EROFS if _read_only(first) else errno.EACCES, "not writable")
        return f"{first}: {output_error(first, e).problem}"
    return None


def _read_only(path: Path) -> bool:
    return bool(os.statvfs(path).f_flag & os.ST_RDONLY)


def atomic_write(path: Path, write: Callable[[BinaryIO], None], *, overwrite: bool = False) -> Path:
    """Call ``write`` on a temporary file next to ``path``, fsync, then rename it to ``path``.

    Raises:
        FileExistsError: ``path`` exists and ``overwrite`` is False (nothing is written).
        OutputError: It cannot be written (full disk, read-only, a parent is a file, ...);
            nothing is left behind and an earlier file at ``path`` is untouched.
    """
    path = Path(path)
    check_writable(path, overwrite=overwrite)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise output_error(path, e) from e
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # mkstemp's 0600 would make results private by accident
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise output_error(path, e) from e
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: Path, text: str, *, overwrite: bool = False) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically (see :func:`atomic_write`).

    A lone surrogate (which UTF-8 cannot encode; a sample file may carry one) is written as
    its ``\\udXXX`` escape, visibly, instead of failing the write.
    """
    data = text.encode("utf-8", errors="backslashreplace")
    return atomic_write(path, lambda f: f.write(data), overwrite=overwrite)


def json_text(obj: Any, **kwargs: Any) -> str:
    """``json.dumps`` keeping non-ASCII text as is, unless a lone surrogate needs ``\\u`` escapes.

    The result always encodes as UTF-8 and reads back to ``obj`` exactly.
    """
    text = json.dumps(obj, ensure_ascii=False, **kwargs)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(obj, ensure_ascii=True, **kwargs)
    return text


def atomic_write_json(path: Path, obj: Any, *, overwrite: bool = False) -> Path:
    """Write ``obj`` as indented JSON, atomically (see :func:`atomic_write_text`)."""
    return atomic_write_text(path, json_text(obj, indent=2) + "\n", overwrite=overwrite)


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


@contextmanager
def dir_lock(directory: Path, busy: Callable[[], Exception]) -> Iterator[None]:
    """Hold an exclusive lock on ``directory`` (``.lock`` inside it, ``flock``) for the block.

    The directory is created if needed; on leaving, the lock file is removed, and so are the
    folders this call created while they are empty (a run that failed before
    writing anything leaves nothing behind). Two processes never both hold one directory:
    a lock file removed by its holder while another process opened it is detected (by inode)
    and the new one locked instead.

    Raises:
        OutputError: ``directory`` is a file, or cannot be created.
        Exception: ``busy()``, when another process holds the lock (nothing waits).
    """
    import fcntl

    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise OutputError(directory, "is a file, not a folder", "give a folder path")
    created = [d for d in (directory, *directory.parents) if not d.exists()]
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise output_error(directory, e) from e
    lock = directory / ".lock"
    for _ in range(10):
        f = lock.open("a")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as e:
            f.close()
            raise busy() from e
        try:
            if os.stat(lock).st_ino == os.fstat(f.fileno()).st_ino:
                break
        except FileNotFoundError:
            pass
        f.close()  # its holder removed it while we opened it: lock the one there now
    else:
        raise busy()
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)
        with suppress(OSError):  # not empty: the run wrote its outputs
            for d in created:
                d.rmdir()
        f.close()


def file_sha256(path: Path) -> str:
    """The SHA-256 of a file's bytes (hex), read in 1 MiB blocks."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(2**20):
            h.update(block)
    return h.hexdigest()


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
