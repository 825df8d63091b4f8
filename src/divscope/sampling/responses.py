"""Server responses -> divscope JSONL response records (logprobs column-wise, float32 digits)."""

from __future__ import annotations

import json
from typing import Any

import numpy as np


def f32(values: list) -> list:
    """Logprobs at float32 precision, which is what servers compute: each value becomes the
    float whose shortest decimal round-trips the same float32 (None stays None). Halves the
    size of the JSON against printing float64 digits of a float32 number."""
    return [None if v is None else float(str(np.float32(v))) for v in values]


def topk_columns(entries: list[tuple[str, float]], k: int) -> tuple[list[str], list[float]]:
    best: dict[str, float] = {}
    for tok, lp in entries:
        if tok not in best or lp > best[tok]:
            best[tok] = lp
    ordered = sorted(best.items(), key=lambda kv: -kv[1])[:k]
    return [t for t, _ in ordered], [v for _, v in ordered]


def chat_response_record(body: dict[str, Any], top_k: int, seed: int | None) -> dict[str, Any]:
    """A chat.completion body -> one divscope JSONL response (logprobs stored column-wise).

    Servers that append the sampled token to ``top_logprobs`` when it falls outside the top-k
    are normalised to the top-k proper (the sampled token's logprob is kept separately).
    """
    choices = body.get("choices") or []
    if not choices:
        return {
            "text": "",
            "finish_reason": None,
            "logprobs": None,
            "error": f"no choices: {json.dumps(body)[:200]}",
        }
    choice = choices[0]
    text = (choice.get("message") or {}).get("content") or ""
    content = (choice.get("logprobs") or {}).get("content")
    record: dict[str, Any] = {
        "text": text,
        "finish_reason": choice.get("finish_reason"),
        "id": body.get("id"),
        "seed": seed,
        "usage": body.get("usage"),
    }
    if not content:
        record["logprobs"] = None  # the provider dropped them: recorded, counted, not scored
        return record
    tokens, lps, top_t, top_l = [], [], [], []
    for d in content:
        tokens.append(d["token"])
        lps.append(d["logprob"])
        t, v = topk_columns(
            [(e["token"], e["logprob"]) for e in d.get("top_logprobs") or []], top_k
        )
        top_t.append(t)
        top_l.append(v)
    record["logprobs"] = {
        "tokens": tokens,
        "logprobs": f32(lps),
        "top_tokens": top_t,
        "top_logprobs": [f32(x) for x in top_l],
    }
    if "".join(tokens) != text:
        record["text_matches_tokens"] = False
    return record
