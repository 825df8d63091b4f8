"""Read the key-value metadata of a GGUF file (chat template, special tokens) in pure Python."""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any, BinaryIO

# GGUF value types: https://github.com/ggml-org/ggml/blob/master/docs/gguf.md
_SCALARS = {
    0: "<B",
    1: "<b",
    2: "<H",
    3: "<h",
    4: "<I",
    5: "<i",
    6: "<f",
    7: "<?",
    10: "<Q",
    11: "<q",
    12: "<d",
}
_STRING, _ARRAY = 8, 9


_MIN_SIZE = {_STRING: 8, _ARRAY: 12}  # bytes an element takes at least (a length or two)
_MAX_NESTING = 8  # arrays of arrays of ...: real files nest one level


class _Reader:
    """Reads a GGUF header, never past the end of the file: every length the file declares
    is checked against the bytes left before anything is read or allocated (a junk file
    that declares a 2**60-byte string is an error, not a MemoryError)."""

    def __init__(self, f: BinaryIO, path: Path) -> None:
        self.f, self.path = f, path
        self.size = path.stat().st_size

    def fail(self, problem: str) -> ValueError:
        return ValueError(f"{self.path}: not a valid GGUF file ({problem})")

    def take(self, n: int, what: str) -> bytes:
        left = self.size - self.f.tell()
        if n > left:
            raise self.fail(f"{what} declares {n} bytes, past the end of the file ({left} left)")
        return self.f.read(n)

    def scalar(self, fmt: str, what: str = "a header field") -> Any:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt), what))[0]

    def string(self) -> str:
        n = self.scalar("<Q", "a string length")
        return self.take(n, "a string").decode("utf-8", errors="replace")

    def count(self, n: int, each: int, what: str) -> int:
        """``n`` items of at least ``each`` bytes, refused when they cannot fit the file."""
        if n * each > self.size - self.f.tell():
            raise self.fail(f"{what} declares {n} items, more than the file can hold")
        return n

    def value(self, vtype: int, depth: int = 0) -> Any:
        if vtype in _SCALARS:
            return self.scalar(_SCALARS[vtype], "a value")
        if vtype == _STRING:
            return self.string()
        if vtype != _ARRAY:
            raise self.fail(f"unknown value type {vtype}")
        if depth >= _MAX_NESTING:
            raise self.fail(f"arrays nested more than {_MAX_NESTING} deep")
        etype, n = self.scalar("<I", "an array type"), self.scalar("<Q", "an array length")
        if etype in _SCALARS:
            fmt = _SCALARS[etype]
            raw = self.take(struct.calcsize(fmt) * n, "an array")
            return list(struct.unpack(f"<{n}{fmt[1]}", raw))
        if etype not in _MIN_SIZE:
            raise self.fail(f"unknown array element type {etype}")
        self.count(n, _MIN_SIZE[etype], "an array")
        return [self.value(etype, depth + 1) for _ in range(n)]


def read_gguf_metadata(path: str | Path) -> dict[str, Any]:
    """All key-value metadata of a GGUF file (tensor data is not read), read within the
    file's size whatever lengths it declares.

    Raises:
        ValueError: Not a GGUF file, or its header is truncated or corrupt (naming the file).
    """
    path = Path(path)
    with path.open("rb") as f:
        if f.read(4) != b"GGUF":
            raise ValueError(f"{path} is not a GGUF file")
        r = _Reader(f, path)
        version = r.scalar("<I", "the version")
        if version < 2:
            raise ValueError(f"{path}: GGUF version {version} is not supported")
        r.scalar("<Q", "the tensor count")
        n_kv = r.count(r.scalar("<Q", "the key count"), 8 + 4, "the key-value table")
        meta: dict[str, Any] = {"GGUF.version": version}
        for _ in range(n_kv):
            key = r.string()
            meta[key] = r.value(r.scalar("<I", "a value type"))
    return meta


def chat_template_info(path: str | Path) -> dict[str, Any]:
    """The chat template and special tokens a GGUF model was packaged with.

    Returns:
        ``{"chat_template", "bos_token", "eos_token", "add_bos_token"}`` (None where absent).
    """
    meta = read_gguf_metadata(path)
    tokens = meta.get("tokenizer.ggml.tokens") or []

    def tok(key: str) -> str | None:
        i = meta.get(key)
        return tokens[i] if isinstance(i, int) and 0 <= i < len(tokens) else None

    return {
        "chat_template": meta.get("tokenizer.chat_template"),
        "bos_token": tok("tokenizer.ggml.bos_token_id"),
        "eos_token": tok("tokenizer.ggml.eos_token_id"),
        "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", True)),
    }
