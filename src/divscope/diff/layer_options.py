"""The options of ``divscope diff --layers`` that the CLI checks before torch is imported:
how many leading blocks get the causal check, and against how many random directions."""

from __future__ import annotations

import re

from divscope.diff.conditions import DiffInputError
from divscope.models.checks import is_integer

N_RANDOM = 10  # random directions per checked block in the causal check (p-value >= 1/11)
N_CAUSAL = 2  # default number of leading blocks that get the causal check ("all": every block)


def causal_blocks_problem(n: object) -> str | None:
    """Why ``n`` is not a number of blocks for the causal check (an integer >= 0 or "all")."""
    if n == "all" or (is_integer(n) and n >= 0):  # type: ignore[operator]
        return None
    return (f"--causal-blocks {n!r} must be an integer >= 0 (the leading blocks to check) or "
            "'all'. Fix: e.g. --causal-blocks 2 (kl_demo: CAUSAL_BLOCKS = 2)")  # fmt: skip


def parse_causal_blocks(text: str) -> int | str:
    """The ``--causal-blocks`` value: ``"all"`` or an integer >= 0 (else DiffInputError)."""
    s = text.strip().lower()
    value: int | str = int(s) if re.fullmatch(r"-?[0-9]+", s) else s
    if problem := causal_blocks_problem(value):
        raise DiffInputError(problem)
    return value
