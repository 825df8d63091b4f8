"""Writing sample files as divscope JSONL (the format new data should use)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from divscope.runmeta import atomic_write_text, json_text
from divscope.samples.records import FORMAT, PromptSamples, SampleSet, TokenScores, TokenVocab


def _columns(s: TokenScores) -> dict[str, Any]:
    top_tokens, top_lps = [], []
    for ids, lps in zip(s.top_ids, s.top_logprobs, strict=True):
        keep = ids >= 0
        top_tokens.append(ids[keep].tolist())
        top_lps.append(lps[keep].tolist())
    return {
        "tokens": s.tokens,
        "logprobs": [None if math.isnan(v) else v for v in s.logprobs.tolist()],
        "top_token_ids": top_tokens,  # replaced by strings in record_to_json
        "top_logprobs": top_lps,
        "token_ids": None if s.token_ids is None else s.token_ids.tolist(),
        "byte_offsets": None if s.byte_offsets is None else s.byte_offsets.tolist(),
    }


def record_to_json(rec: PromptSamples, vocab: TokenVocab) -> dict[str, Any]:
    """Return ``rec`` as a divscope JSONL record (a JSON-ready dict)."""

    def cols(s: TokenScores) -> dict[str, Any]:
        c = _columns(s)
        c["top_tokens"] = [[vocab.strings[j] for j in row] for row in c.pop("top_token_ids")]
        return c

    responses = []
    for r in rec.responses:
        out: dict[str, Any] = {
            "text": r.text,
            "finish_reason": r.finish_reason,
            "logprobs": None if r.scores is None else cols(r.scores),
        }
        if r.scores is None and r.excluded_reason and r.excluded_reason.startswith(("API", "err")):
            out["error"] = r.excluded_reason
        if r.cross:
            out["cross_scores"] = {
                m: {"aligned": c.aligned, **cols(c.scores)} for m, c in r.cross.items()
            }
        responses.append(out)
    return {
        "format": FORMAT,
        "index": rec.index,
        "prompt": rec.prompt,
        "model": rec.model,
        "category": rec.category,
        "responses": responses,
    }


def write_samples_jsonl(samples: SampleSet, path: str | Path, *, overwrite: bool = False) -> Path:
    """Write ``samples`` as divscope JSONL, atomically.

    Raises:
        FileExistsError: ``path`` exists and ``overwrite`` is False.
    """
    lines = [
        # -inf (probability 0) is written as -Infinity, which load_samples reads back.
        json_text(record_to_json(r, samples.vocab))
        for r in samples.records
    ]
    return atomic_write_text(Path(path), "\n".join(lines) + "\n", overwrite=overwrite)
