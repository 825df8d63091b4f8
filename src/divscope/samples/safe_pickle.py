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

from divscope.bounded import TooLarge, nested_size, node_budget
from divscope.samples.errors import SampleFileError

_FIX = (
    "only pickles of plain dict/list/tuple/str/bytes/int/float/bool/None are read; "
    "convert the file to divscope JSONL in a trusted environment (divscope convert)"
)
# Protocol <= 2 pickles encode `bytes` as a call to _codecs.encode(str, "latin1"). That call is
# the one admitted, and only in that form: other codecs ("hex", "base64") grow their input, and a
# chain of them in a few hundred bytes would fill memory.
_LATIN1 = {"latin1", "latin-1", "iso-8859-1", "iso8859-1"}
_PLAIN = (dict, list, tuple, str, bytes, int, float, bool, type(None))


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file: io.BufferedIOBase, path: Path) -> None:
        super().__init__(file)
        self._path = path

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("_codecs", "encode"):
            return self._latin1_encode
        raise SampleFileError(
            self._path,
            f"the pickle asks for the global {module}.{name}; refused, nothing in the file was run",
            _FIX,
        )

    def _latin1_encode(self, text: Any, encoding: Any = "utf-8", *_: Any) -> bytes:
        if type(text) is not str or not isinstance(encoding, str) or encoding not in _LATIN1:
            raise SampleFileError(
                self._path,
                f"the pickle calls _codecs.encode with {type(text).__name__} and "
                f"{str(encoding)[:20]!r}; only (str, 'latin1') is admitted (the form protocol "
                "0-2 pickles use for bytes); refused",
                _FIX,
            )
        return text.encode("latin1")

    def persistent_load(self, pid: Any) -> Any:
        raise SampleFileError(self._path, "the pickle uses persistent ids; refused", _FIX)


def _check_plain(obj: Any, path: Path, n_bytes: int) -> None:
    """Refuse anything but plain builtins, deep nesting, or more objects than the size allows."""

    def admit(x: Any) -> None:
        if not isinstance(x, _PLAIN):
            raise SampleFileError(path, f"the pickle holds a {type(x).__name__}", _FIX)

    try:
        nested_size(obj, max_nodes=node_budget(n_bytes), admit=admit)
    except TooLarge as e:
        raise SampleFileError(path, f"the pickle {e.problem}", _FIX) from e


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
    _check_plain(obj, path, len(data))
    return obj
