"""Untrusted and cached files read within bounds, and checked.

Pickle and YAML can both reference one object many times (memo ids, anchors and aliases), so a
file of a few hundred bytes can describe 2**40 objects to any reader that walks it as a tree
(validation, hashing, JSON). :func:`nested_size` counts what such a reader would see in time
linear in the distinct objects, and refuses past a bound set relative to the file's size.

``np.load`` trusts a file's headers: a zip member declares its uncompressed size and an ``.npy``
header its shape, and memory follows them before a byte of data is checked (a 2 MB zip of zeros
declares gigabytes). :func:`open_npz` reads every member's headers first. Cache units
(:func:`write_unit_arrays`, :func:`read_unit_arrays`; JSON ones: :func:`write_unit_json`,
:func:`read_unit_json`) also carry a checksum of their content and their cache key, so a
truncated, tampered or renamed unit is recomputed instead of used.
"""

from __future__ import annotations

import hashlib
import json
import math
import zipfile
import zlib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from divscope.runmeta import atomic_write, atomic_write_text, json_text

MAX_DEPTH = 64
NODES_PER_BYTE, MIN_NODES = 4, 100_000  # real files: 0.2 objects per byte (pickle), <1 (YAML)


class TooLarge(ValueError):
    """Nested data past a bound: ``problem`` says which."""

    def __init__(self, problem: str) -> None:
        super().__init__(problem)
        self.problem = problem


def node_budget(n_bytes: int) -> int:
    """The most objects a file of ``n_bytes`` may describe."""
    return max(MIN_NODES, NODES_PER_BYTE * n_bytes)


def nested_size(
    obj: Any,
    *,
    max_nodes: int,
    max_depth: int = MAX_DEPTH,
    admit: Callable[[Any], None] | None = None,
) -> int:
    """Objects in ``obj`` counting every reference (a tree walk's count), without the walk.

    Sizes are memoised by object id, so shared references cost one lookup each.

    Args:
        obj: Nested dicts, lists and tuples of anything.
        max_nodes: Refuse past this many objects.
        max_depth: Refuse nesting deeper than this (cycles included).
        admit: Called on every distinct object first; it raises to refuse one.

    Raises:
        TooLarge: Past ``max_nodes`` or ``max_depth``.
    """
    sizes: dict[int, tuple[int, int]] = {}  # id -> (objects in the tree, height)

    def walk(x: Any, depth: int) -> tuple[int, int]:
        if depth > max_depth:
            raise TooLarge(f"nested more than {max_depth} levels deep")
        if id(x) in sizes:
            n, h = sizes[id(x)]
            if depth + h > max_depth:
                raise TooLarge(f"nested more than {max_depth} levels deep")
            return n, h
        if admit is not None:
            admit(x)
        if not isinstance(x, dict | list | tuple):
            return 1, 0
        n, h = 1, 0
        for c in [c for kv in x.items() for c in kv] if isinstance(x, dict) else x:
            cn, ch = walk(c, depth + 1)
            n, h = n + cn, max(h, ch + 1)
            if n > max_nodes:
                raise TooLarge(
                    f"describes over {max_nodes} objects (shared references repeated): "
                    "refused as a resource bomb"
                )
        sizes[id(x)] = (n, h)
        return n, h

    return walk(obj, 0)[0]


MAX_INT_DIGITS = 40  # longer integers are corrupt data (Python refuses over 4300 with a traceback)


def json_int(text: str) -> int:
    """``json.loads``' ``parse_int`` for untrusted files: a ValueError (which readers report
    as corrupt JSON) for an integer of more than :data:`MAX_INT_DIGITS` digits."""
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise ValueError(f"an integer with {len(text.lstrip('-'))} digits")
    return int(text)


class UnreadableFile(ValueError):
    """A file that cannot be read as what it should be: ``problem`` and ``fix`` say why."""

    def __init__(self, problem: str, fix: str) -> None:
        super().__init__(f"{problem}. Fix: {fix}")
        self.problem, self.fix = problem, fix


def read_yaml(path: Path) -> Any:
    """A YAML file's content (safe loader), its size bounded by :func:`node_budget`.

    Raises:
        UnreadableFile: Missing, a directory, not UTF-8 text, not YAML, or too large expanded.
    """
    if path.is_dir():
        raise UnreadableFile("is a directory", "give the path of a YAML file")
    try:
        data = path.read_bytes()
    except FileNotFoundError as e:
        raise UnreadableFile("no such file", "check the path") from e
    except OSError as e:
        raise UnreadableFile(f"cannot be read ({e.strerror})", "check the path") from e
    try:
        raw = yaml.safe_load(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise UnreadableFile(
            f"is not UTF-8 text ({e.reason} at byte {e.start})", "save it as UTF-8"
        ) from e
    except yaml.YAMLError as e:
        raise UnreadableFile(f"not valid YAML ({e})", "fix the syntax") from e
    except RecursionError as e:
        raise UnreadableFile("is nested too deeply", "flatten it") from e
    try:
        nested_size(raw, max_nodes=node_budget(len(data)))
    except TooLarge as e:
        raise UnreadableFile(e.problem, "write the values out instead of repeating aliases") from e
    return raw


# what reading a damaged zip member raises: a bad CRC or header, a broken deflate stream, a
# short member
_ZIP_ERRORS = (zipfile.BadZipFile, zlib.error, EOFError, OSError, NotImplementedError)
MAX_EXPANSION = 64  # declared uncompressed bytes per byte on disk (.npy compresses far less)
MIN_BUDGET = 256 * 2**20  # small files may still hold this much (sparse or constant arrays)
_CHECKSUM = "sha256"


class ArrayFileError(ValueError):
    """An ``.npz`` file (or a cache unit) that is not what it claims (the message names the
    file and problem)."""

    def __init__(self, path: Path, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path, self.problem = path, problem


def _member_size(zf: zipfile.ZipFile, info: zipfile.ZipInfo, path: Path) -> int:
    """The data bytes an ``.npy`` member's header declares, checked against the member."""
    name = info.filename
    if not name.endswith(".npy"):
        raise ArrayFileError(path, f"member {name!r} is not an .npy array")
    with zf.open(info) as f:
        try:
            version = np.lib.format.read_magic(f)
            read_header = (
                np.lib.format.read_array_header_1_0
                if version == (1, 0)
                else np.lib.format.read_array_header_2_0
            )
            shape, _, dtype = read_header(f)
        except Exception as e:  # noqa: BLE001 - a bad header fails in many ways
            raise ArrayFileError(path, f"member {name!r} has no valid .npy header ({e})") from e
        header = f.tell()
    if dtype.hasobject:
        raise ArrayFileError(path, f"member {name!r} holds Python objects (a pickle)")
    nbytes = math.prod(shape) * dtype.itemsize
    if header + nbytes != info.file_size:
        raise ArrayFileError(
            path,
            f"member {name!r}: its header declares {shape} {dtype} ({nbytes} bytes) but the "
            f"member holds {info.file_size - header}",
        )
    return nbytes


def open_npz(path: Path, *, max_expansion: int = MAX_EXPANSION) -> np.lib.npyio.NpzFile:
    """``np.load(path)`` after checking every member's headers (no pickles, bounded size).

    Raises:
        ArrayFileError: Not a zip of ``.npy`` arrays, a header that disagrees with its member,
            or more declared bytes than ``max(MIN_BUDGET, max_expansion x file size)``.
    """
    budget = max(MIN_BUDGET, max_expansion * path.stat().st_size)
    with path.open("rb") as f:
        if f.read(6) == b"\x93NUMPY":
            raise ArrayFileError(path, "holds a single array, not an .npz of named arrays")
    try:
        with zipfile.ZipFile(path) as zf:
            total = 0
            for info in zf.infolist():
                total += info.file_size  # the zip's declaration: checked before any inflation
                if total > budget:
                    raise ArrayFileError(
                        path,
                        f"declares over {total} bytes of arrays in a {path.stat().st_size}-byte "
                        f"file (more than {budget}): a zip bomb or a corrupt file",
                    )
                _member_size(zf, info, path)
    except _ZIP_ERRORS as e:
        raise ArrayFileError(path, f"not a readable .npz ({e})") from e
    return np.load(path, allow_pickle=False)


def _checksum(key: str, arrays: Mapping[str, np.ndarray]) -> np.ndarray:
    h = hashlib.sha256(key.encode())
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"{name}|{a.dtype.str}|{a.shape}|".encode())
        h.update(a.tobytes())
    return np.frombuffer(h.hexdigest().encode(), np.uint8)


def write_unit_arrays(path: Path, key: str, arrays: Mapping[str, np.ndarray]) -> None:
    """Write ``arrays`` and their checksum (bound to ``key``, the unit's cache key) atomically."""
    members = dict(arrays, **{_CHECKSUM: _checksum(key, arrays)})
    atomic_write(path, lambda f: np.savez(f, **members), overwrite=True)


def read_unit_arrays(
    path: Path, key: str, spec: Mapping[str, tuple[str, tuple[int, ...]]]
) -> dict[str, np.ndarray]:
    """A unit's arrays, checked: names, dtype kinds, shapes, no NaN or +inf, the checksum.

    Args:
        path: The unit file.
        key: Its cache key (the checksum binds it: a unit copied under another key fails).
        spec: Array name -> (dtype kind, e.g. ``"f"`` or ``"iu"``; shape, -1 for any size).

    Raises:
        ArrayFileError: What is wrong, naming the file.
    """
    with open_npz(path) as z:
        names = set(z.files) - {_CHECKSUM}
        if names != set(spec):
            raise ArrayFileError(path, f"holds {sorted(names)}, expected {sorted(spec)}")
        if _CHECKSUM not in z.files:
            raise ArrayFileError(path, "has no checksum (written by an older divscope)")
        try:  # members are read (and their CRCs checked) only here
            arrays = {name: z[name] for name in spec}
            stored = z[_CHECKSUM]
        except (*_ZIP_ERRORS, ValueError) as e:
            raise ArrayFileError(path, f"a member cannot be read ({e})") from e
    for name, (kinds, shape) in spec.items():
        a = arrays[name]
        if (
            a.dtype.kind not in kinds
            or a.ndim != len(shape)
            or any(want not in (-1, got) for want, got in zip(shape, a.shape, strict=True))
        ):
            raise ArrayFileError(path, f"{name} is {a.dtype} {a.shape}, expected {kinds} {shape}")
        if a.dtype.kind == "f" and (np.isnan(a).any() or (a == np.inf).any()):
            raise ArrayFileError(path, f"{name} holds NaN or +inf")
    if not np.array_equal(stored, _checksum(key, arrays)):
        raise ArrayFileError(path, "its checksum does not match its content (corrupt or edited)")
    return arrays


def _json_checksum(key: str, value: Any) -> str:
    return hashlib.sha256(json.dumps([key, value], sort_keys=True).encode()).hexdigest()


def write_unit_json(path: Path, key: str, value: Any) -> None:
    """Write a JSON-able ``value`` with its cache ``key`` and a checksum of both, atomically."""
    doc = {"key": key, "value": value, _CHECKSUM: _json_checksum(key, value)}
    atomic_write_text(path, json_text(doc), overwrite=True)


def read_unit_json(path: Path, key: str, check: Callable[[Any], str | None]) -> Any:
    """A value written by :func:`write_unit_json` under ``key``, checked.

    Args:
        path: The unit file.
        key: Its cache key: a file written under another key (renamed, or swapped with
            another unit) fails.
        check: What is wrong with the value (None when nothing is), after the checksum.

    Raises:
        ArrayFileError: Not UTF-8 JSON (truncated, NUL-padded), another key, a checksum that
            does not match, or a value that ``check`` refuses; the message names the file.
    """
    try:
        doc = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise ArrayFileError(path, f"is not a readable JSON unit ({str(e)[:100]})") from e
    except OSError as e:
        raise ArrayFileError(path, f"cannot be read ({e.strerror})") from e
    if not isinstance(doc, dict) or set(doc) != {"key", "value", _CHECKSUM}:
        raise ArrayFileError(path, "is not a divscope cache unit (written by an older divscope?)")
    if doc["key"] != key:
        raise ArrayFileError(path, f"was written for another unit ({str(doc['key'])[:80]!r})")
    if doc[_CHECKSUM] != _json_checksum(key, doc["value"]):
        raise ArrayFileError(path, "its checksum does not match its content (corrupt or edited)")
    problem = check(doc["value"])
    if problem is not None:
        raise ArrayFileError(path, problem)
    return doc["value"]
