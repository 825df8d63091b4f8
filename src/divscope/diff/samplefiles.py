"""Sample-file columns for a diff's responses: token strings unique per id, and the
``logprobs`` / ``cross_scores`` columns of the divscope JSONL format."""

from __future__ import annotations

from typing import Any

import numpy as np

from divscope.samples.records import FORMAT
from divscope.sampling.responses import f32


def token_strings(tokenizer: Any) -> list[str]:
    """One string per token id: the decoded token, made unique with ``<id>`` where several ids
    decode alike (byte pieces), so that files keyed by token strings stay exact."""
    n = len(tokenizer)
    decoded = tokenizer.batch_decode([[i] for i in range(n)])
    seen: dict[str, int] = {}
    for s in decoded:
        seen[s] = seen.get(s, 0) + 1
    return [s if seen[s] == 1 else f"{s}<{i}>" for i, s in enumerate(decoded)]


def columns(ids: list[int], lp: np.ndarray, top_ids: np.ndarray, top_lp: np.ndarray,
             strings: list[str]) -> dict[str, Any]:  # fmt: skip
    return {
        "tokens": [strings[t] for t in ids],
        "logprobs": f32(lp.tolist()),
        "top_tokens": [[strings[t] for t in row] for row in top_ids.tolist()],
        "top_logprobs": [f32(row) for row in top_lp.tolist()],
        "token_ids": list(ids),
    }


def prompt_record(prompt: Any, model: str, responses: list[dict[str, Any]]) -> dict[str, Any]:
    """One prompt's divscope JSONL record (``prompt`` a :class:`PromptItem`)."""
    return {
        "format": FORMAT,
        "index": prompt.index,
        "prompt": prompt.prompt,
        "model": model,
        "category": prompt.category,
        "responses": responses,
    }
