"""Read legacy pickles without running anything in them.

Only plain builtins are admitted: dict, list, tuple, str, bytes, int, float, bool and None.
These are all built by pickle opcodes directly; any opcode that would look up a global
(a class, a function, ``__reduce__`` payloads) is refused before anything is called.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

from divscope.samples.errors import SampleFileError

_FIX = (
    "only pickles of plain dict/list/tuple/str/bytes/int/float/bool/None are read; "
    "convert the file to divscope JSONL in a trusted environment (divscope convert)"
)
# Protocol <= 2 pickles encode `bytes` as a call to _codecs.encode(str, "latin1"); that
# function only encodes a string, so it is the one callable admitted.
_ALLOWED_GLOBALS = {("_codecs", "encode")}
_PLAIN = (dict, list, tuple, str, bytes, int, float, bool, type(None))


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file: io.BufferedIOBase, path: Path) -> None:
        super().__init__(file)
        self._path = path

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise SampleFileError(
            self._path,
            f"the pickle asks for the global {module}.{name}; refused, nothing in the file was run",
            _FIX,
        )

    def persistent_load(self, pid: Any) -> Any:
        raise SampleFileError(self._path, "the pickle uses persistent ids; refused", _FIX)


def _check_plain(obj: Any, path: Path, depth: int = 0) -> None:
    if depth > 64:
        raise SampleFileError(path, "the pickle is nested more than 64 levels deep", _FIX)
    if not isinstance(obj, _PLAIN):
        raise SampleFileError(path, f"the pickle holds a {type(obj).__name__}", _FIX)
    if isinstance(obj, dict):
        for k, v in obj.items():
            _check_plain(k, path, depth + 1)
            _check_plain(v, path, depth + 1)
    elif isinstance(obj, list | tuple):
        for v in obj:
            _check_plain(v, path, depth + 1)


def safe_load_pickle(path: str | Path) -> Any:
    """Unpickle ``path`` admitting only plain builtins.

    Args:
        path: The pickle file.

    Returns:
        The unpickled object (nested dicts/lists of plain values).

    Raises:
        SampleFileError: The file is truncated, corrupt, or asks for anything but plain builtins.
    """
    path = Path(path)
    data = path.read_bytes()
    try:
        obj = _RestrictedUnpickler(io.BytesIO(data), path).load()
    except SampleFileError:
        raise
    except RecursionError as e:
        raise SampleFileError(path, "the pickle is nested too deeply", _FIX) from e
    except Exception as e:  # noqa: BLE001 - any unpickling failure means a corrupt file
        raise SampleFileError(
            path,
            f"the pickle is truncated or corrupt ({type(e).__name__}: {e})",
            "re-copy or re-create the file; " + _FIX,
        ) from e
    _check_plain(obj, path)
    return obj
