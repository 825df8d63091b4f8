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


def _trailing_stop_token(tokens: list[str], text: str, finish: str | None) -> bool:
    """Whether the last logprob entry is the end-of-turn token that stopped the response and
    is not part of its text. vLLM reports it (``<|im_end|>``, or ``""`` when special tokens
    are skipped); llama.cpp does not. It is set aside so that a response's tokens are its
    text's, as cross-scoring (which scores the text) and other servers have them."""
    return (
        finish == "stop"
        and bool(tokens)
        and "".join(tokens[:-1]) == text
        and (tokens[-1] == "" or "".join(tokens) != text)
    )


def chat_response_record(body: dict[str, Any], top_k: int, seed: int | None) -> dict[str, Any]:
    """A chat.completion body -> one divscope JSONL response (logprobs stored column-wise).

    Servers that append the sampled token to ``top_logprobs`` when it falls outside the top-k
    are normalised to the top-k proper (the sampled token's logprob is kept separately). An
    end-of-turn token reported after the text is kept aside as ``stop_token``.
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
    stop = _trailing_stop_token(tokens, text, record["finish_reason"])
    if stop:
        record["stop_token"] = {"token": tokens[-1], "logprob": f32(lps[-1:])[0]}
        tokens, lps, top_t, top_l = tokens[:-1], lps[:-1], top_t[:-1], top_l[:-1]
    record["logprobs"] = {
        "tokens": tokens,
        "logprobs": f32(lps),
        "top_tokens": top_t,
        "top_logprobs": [f32(x) for x in top_l],
    }
    if "".join(tokens) != text:
        record["text_matches_tokens"] = False
    return record
