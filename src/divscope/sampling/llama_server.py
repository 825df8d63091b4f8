"""Run llama-cpp-python's OpenAI-compatible server with a fast top-k for logprobs.

``python -m divscope.sampling.llama_server --model M.gguf --logits_all True ...`` takes the same
arguments as ``python -m llama_cpp.server`` and runs that server unchanged except for one
thing: to build ``top_logprobs`` it sorts the whole vocabulary in Python for every token
(``sorted(zip(logprobs, range(n_vocab)), reverse=True)``), about 0.4 s per token for Gemma's
262k-token vocabulary. Here that call returns only the first entries of the same ordering,
found with ``numpy.argpartition``; the server only ever slices the first ``logprobs``
(at most 20) of it, so responses are identical (``tests/test_llama_server.py`` checks this).

``--reproducible`` (consumed here, not passed on) makes every request evaluate its prompt from
an empty context instead of reusing the prefix it shares with the previous request. llama.cpp's
kernels round differently for different batch splits (seen on AVX2 CPUs), so with prefix reuse
the same request can sample other tokens depending on what ran before it; with the flag a
seeded request gives the same response whatever the order of requests (a resumed sampling run
reproduces an uninterrupted one), at the cost of re-evaluating shared prefixes.
"""

from __future__ import annotations

import builtins
import runpy
import sys
from collections.abc import Iterable
from typing import Any

import numpy as np

KEEP = 256  # entries of the ordering that are materialised (the server uses <= 20)


def _unzip_list_range(it: zip) -> tuple[Any, range] | None:
    """The (values, range) a ``zip(values, range(n))`` was built from, when still unconsumed;
    values is a list or a 1-D numpy array."""
    try:
        _, (a, b) = it.__reduce__()
        fa, (lst,), ia = a.__reduce__()
        fb, (rng,), ib = b.__reduce__()
    except (TypeError, ValueError, AttributeError):
        return None
    if (
        isinstance(lst, list | np.ndarray)
        and isinstance(rng, range)
        and ia == 0
        and ib == 0
        and rng.start == 0
        and rng.step == 1
        and len(rng) == len(lst)
    ):
        return lst, rng
    return None


def fast_sorted(iterable: Iterable, /, *, key: Any = None, reverse: bool = False) -> list:
    """``sorted`` that, for ``zip(values, range(n))`` with ``reverse=True``, returns only the
    first :data:`KEEP` items of the exact same ordering; anything else is plain ``sorted``."""
    if key is None and reverse and isinstance(iterable, zip):
        parts = _unzip_list_range(iterable)
        if parts is not None:
            values = np.asarray(parts[0], dtype=np.float64)
            if values.size > KEEP:
                idx = np.argpartition(-values, KEEP)[:KEEP]
                cand = [(parts[0][i], int(i)) for i in idx]
                return builtins.sorted(cand, reverse=True)
            return builtins.sorted(zip(parts[0], parts[1], strict=True), reverse=True)
    return builtins.sorted(iterable, key=key, reverse=reverse)


def patch() -> None:
    """Install :func:`fast_sorted` as ``sorted`` inside ``llama_cpp.llama`` only."""
    import llama_cpp.llama

    llama_cpp.llama.sorted = fast_sorted


def evaluate_from_scratch() -> None:
    """Make ``Llama.generate`` start every request from an empty context (no prefix reuse)."""
    import llama_cpp.llama

    generate = llama_cpp.llama.Llama.generate

    def fresh_generate(self: Any, tokens: Any, *args: Any, **kwargs: Any) -> Any:
        self.reset()
        return generate(self, tokens, *args, **kwargs)

    llama_cpp.llama.Llama.generate = fresh_generate


def main() -> None:
    patch()
    if "--reproducible" in sys.argv:
        sys.argv.remove("--reproducible")
        evaluate_from_scratch()
    sys.argv[0] = "llama_cpp.server"
    runpy.run_module("llama_cpp.server", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
