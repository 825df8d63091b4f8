"""Raw sample records (OpenAI chat.completion or divscope JSONL dicts) -> checked arrays.

Every value is validated as it is read; a bad one raises :class:`SampleFileError` naming the
file, record, response and token, and the fix.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import Any

import numpy as np

from divscope.samples.errors import SampleFileError
from divscope.samples.records import (
    _LOGPROB_TOLERANCE,
    CrossScore,
    PromptSamples,
    Response,
    TokenScores,
    TokenVocab,
    exclusion_reason,
)


class Ctx:
    """Where we are in a file, for error messages."""

    def __init__(self, path: Path, record: int | None = None, response: int | None = None):
        self.path, self.record, self.response = path, record, response

    def error(self, problem: str, fix: str, token: int | None = None) -> SampleFileError:
        return SampleFileError(
            self.path, problem, fix, record=self.record, response=self.response, token=token
        )


FIX_SHAPE = (
    "each record must be {prompt, model, responses}; each response an OpenAI chat.completion "
    "with choices[0].logprobs.content[*].{token, logprob, top_logprobs}, or divscope JSONL"
)


def _logprob(v: Any, ctx: Ctx, token: int | None, allow_none: bool = False) -> float:
    if v is None and allow_none:
        return math.nan
    if type(v) not in (float, int):
        raise ctx.error(f"logprob {v!r} is not a number", FIX_SHAPE, token)
    v = float(v)
    if math.isnan(v):
        raise ctx.error(
            "logprob is NaN",
            "re-sample the response or drop it; a NaN log-probability cannot be scored",
            token,
        )
    if v > _LOGPROB_TOLERANCE:
        what = "+inf" if math.isinf(v) else f"{v:g} > 0"
        raise ctx.error(
            f"logprob is {what}, not a log-probability",
            "check that the field holds natural-log probabilities (<= 0) from the server",
            token,
        )
    return min(v, 0.0)


def _str(v: Any, what: str, ctx: Ctx, token: int | None = None) -> str:
    if not isinstance(v, str):
        raise ctx.error(f"{what} is {type(v).__name__}, expected a string", FIX_SHAPE, token)
    return v


def _list(v: Any, what: str, ctx: Ctx, token: int | None = None) -> list:
    if not isinstance(v, list | tuple):
        raise ctx.error(f"{what} is {type(v).__name__}, expected a list", FIX_SHAPE, token)
    return list(v)


def _dict(v: Any, what: str, ctx: Ctx, token: int | None = None) -> dict:
    if not isinstance(v, dict):
        raise ctx.error(f"{what} is {type(v).__name__}, expected an object", FIX_SHAPE, token)
    return v


def _int_array(v: Any, n: int, what: str, ctx: Ctx) -> np.ndarray | None:
    if v is None:
        return None
    values = _list(v, what, ctx)
    if len(values) != n or not set(map(type, values)) <= {int}:
        raise ctx.error(f"{what} must be {n} integers", FIX_SHAPE)
    return np.asarray(values, dtype=np.int64).reshape(n)


_NUMBER = {float, int}
_NUMBER_OR_NONE = {float, int, type(None)}


def _logprob_array(
    values: list, ctx: Ctx, allow_none: bool, token: int | None = None
) -> np.ndarray:
    """Validate a list of logprobs at C speed; on a problem, name the first bad token."""
    if not set(map(type, values)) <= (_NUMBER_OR_NONE if allow_none else _NUMBER):
        for i, v in enumerate(values):
            _logprob(v, ctx, i if token is None else token, allow_none)
    arr = np.array(values, dtype=np.float64).reshape(len(values))  # None -> NaN
    bad = (arr > _LOGPROB_TOLERANCE) | np.isnan(arr)
    if bad.any():
        for i in np.flatnonzero(bad):
            _logprob(values[i], ctx, int(i) if token is None else token, allow_none)
    return np.minimum(arr, 0.0)


def _pack_topk(
    top_tokens: list, top_lps: list, vocab: TokenVocab, ctx: Ctx
) -> tuple[np.ndarray, np.ndarray]:
    """Rows of top-k tokens / logprobs -> ``(T, K)`` ids (-1 padded) and logprobs (-inf)."""
    n = len(top_tokens)
    if len(top_lps) != n:
        raise ctx.error(f"top_tokens/top_logprobs must have one list per token ({n})", FIX_SHAPE)
    if not set(map(type, top_tokens)) | set(map(type, top_lps)) <= {list, tuple}:
        bad = next(
            i
            for i in range(n)
            if type(top_tokens[i]) not in (list, tuple) or type(top_lps[i]) not in (list, tuple)
        )
        raise ctx.error("a top-k entry is not a list", FIX_SHAPE, bad)
    lens = np.fromiter(map(len, top_tokens), dtype=np.int64, count=n)
    if not np.array_equal(lens, np.fromiter(map(len, top_lps), dtype=np.int64, count=n)):
        bad = int(np.flatnonzero(lens != np.fromiter(map(len, top_lps), np.int64, n))[0])
        raise ctx.error("top_tokens and top_logprobs differ in length", FIX_SHAPE, bad)
    k = int(lens.max()) if n else 0
    flat_tokens = list(itertools.chain.from_iterable(top_tokens))
    if not set(map(type, flat_tokens)) <= {str}:
        bad = next(i for i, row in enumerate(top_tokens) if not set(map(type, row)) <= {str})
        raise ctx.error("a top-k token is not a string", FIX_SHAPE, bad)
    flat_lps = list(itertools.chain.from_iterable(top_lps))
    row_of = np.repeat(np.arange(n), lens)
    if not set(map(type, flat_lps)) <= _NUMBER:
        bad = next(i for i, row in enumerate(top_lps) if not set(map(type, row)) <= _NUMBER)
        _logprob_array(list(top_lps[bad]), ctx, False, bad)
    lp_flat = np.array(flat_lps, dtype=np.float64).reshape(len(flat_lps))
    bad = (lp_flat > _LOGPROB_TOLERANCE) | np.isnan(lp_flat)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        _logprob(flat_lps[i], ctx, int(row_of[i]))
    id_flat = vocab.ids(flat_tokens)
    if (lens == k).all():  # the common rectangular case
        return id_flat.reshape(n, k), np.minimum(lp_flat, 0.0).reshape(n, k)
    ids = np.full((n, k), -1, dtype=np.int64)
    lps = np.full((n, k), -np.inf, dtype=np.float64)
    col = np.arange(len(flat_tokens)) - np.repeat(np.cumsum(lens) - lens, lens)
    ids[row_of, col] = id_flat
    lps[row_of, col] = np.minimum(lp_flat, 0.0)
    return ids, lps


def _scores_from_openai(content: Any, ctx: Ctx, vocab: TokenVocab) -> TokenScores:
    """Parse ``choices[0].logprobs.content`` (a list of per-token dicts)."""
    content = _list(content, "logprobs.content", ctx)
    tokens: list[str] = []
    lps: list[float] = []
    top_tokens: list[list[str]] = []
    top_lps: list[list[float]] = []
    offsets: list[int] = []
    have_bytes = True
    offset = 0
    for t, d in enumerate(content):
        d = _dict(d, "a logprobs.content entry", ctx, t)
        tokens.append(_str(d.get("token"), "token", ctx, t))
        lps.append(_logprob(d.get("logprob"), ctx, t, allow_none=True))
        tt: list[str] = []
        tl: list[float] = []
        for e in _list(d.get("top_logprobs") or [], "top_logprobs", ctx, t):
            e = _dict(e, "a top_logprobs entry", ctx, t)
            tt.append(_str(e.get("token"), "top_logprobs token", ctx, t))
            tl.append(_logprob(e.get("logprob"), ctx, t))
        top_tokens.append(tt)
        top_lps.append(tl)
        b = d.get("bytes")
        if have_bytes and isinstance(b, list):
            offsets.append(offset)
            offset += len(b)
        else:
            have_bytes = False
    ids, top_lp = _pack_topk(top_tokens, top_lps, vocab, ctx)
    return TokenScores(
        tokens=tokens,
        ids=vocab.ids(tokens),
        logprobs=np.asarray(lps, dtype=np.float64).reshape(len(lps)),
        top_ids=ids,
        top_logprobs=top_lp,
        byte_offsets=np.asarray(offsets, dtype=np.int64) if have_bytes and tokens else None,
    )


def scores_from_columns(d: Any, ctx: Ctx, vocab: TokenVocab) -> TokenScores:
    """Parse divscope's column-wise ``{tokens, logprobs, top_tokens, top_logprobs, ...}``."""
    d = _dict(d, "logprobs", ctx)
    tokens = _list(d.get("tokens"), "tokens", ctx)
    if not set(map(type, tokens)) <= {str}:
        bad = next(i for i, t in enumerate(tokens) if type(t) is not str)
        raise ctx.error(f"token is {type(tokens[bad]).__name__}, expected a string", FIX_SHAPE, bad)
    n = len(tokens)
    lps = _list(d.get("logprobs"), "logprobs.logprobs", ctx)
    if len(lps) != n:
        raise ctx.error(f"{len(lps)} logprobs for {n} tokens", FIX_SHAPE)
    logprobs = _logprob_array(lps, ctx, allow_none=True)
    top_tokens = d.get("top_tokens")
    top_lps = d.get("top_logprobs")
    if top_tokens is None and top_lps is None:
        top_tokens = top_lps = [[] for _ in range(n)]
    ids, top_lp = _pack_topk(
        _list(top_tokens, "top_tokens", ctx), _list(top_lps, "top_logprobs", ctx), vocab, ctx
    )
    return TokenScores(
        tokens=tokens,
        ids=vocab.ids(tokens),
        logprobs=logprobs,
        top_ids=ids,
        top_logprobs=top_lp,
        token_ids=_int_array(d.get("token_ids"), n, "token_ids", ctx),
        byte_offsets=_int_array(d.get("byte_offsets"), n, "byte_offsets", ctx),
    )


def _parse_response(raw: Any, ctx: Ctx, vocab: TokenVocab) -> Response:
    raw = _dict(raw, "the response", ctx)
    if "choices" in raw or ("error" in raw and "text" not in raw):  # OpenAI chat.completion
        choices = raw.get("choices")
        if not choices:
            err = raw.get("error")
            reason = f"API error: {err}" if err else "no choices in the response"
            return Response(text="", finish_reason=None, scores=None, excluded_reason=reason)
        choice = _dict(_list(choices, "choices", ctx)[0], "choices[0]", ctx)
        message = choice.get("message") or {}
        message = _dict(message, "choices[0].message", ctx)
        text = message.get("content") or ""
        text = _str(text, "message.content", ctx)
        finish = choice.get("finish_reason")
        lp = choice.get("logprobs")
        content = _dict(lp, "choices[0].logprobs", ctx).get("content") if lp else None
        scores = _scores_from_openai(content, ctx, vocab) if content is not None else None
        cross_raw = raw.get("cross_scores")
    else:  # divscope JSONL response
        text = _str(raw.get("text", ""), "text", ctx)
        finish = raw.get("finish_reason")
        lp = raw.get("logprobs")
        scores = scores_from_columns(lp, ctx, vocab) if lp is not None else None
        cross_raw = raw.get("cross_scores")
        if raw.get("error"):
            return Response(text, None, None, excluded_reason=f"error: {raw['error']}")
    if finish is not None and not isinstance(finish, str):
        raise ctx.error("finish_reason must be a string", FIX_SHAPE)
    reason = "no logprobs in the response" if scores is None else exclusion_reason(scores)
    cross: dict[str, CrossScore] = {}
    for model, c in _dict(cross_raw or {}, "cross_scores", ctx).items():
        c = _dict(c, f"cross_scores[{model!r}]", ctx)
        cs = scores_from_columns(c, ctx, vocab)
        aligned = bool(c.get("aligned", False))
        if aligned and scores is not None and cs.tokens != scores.tokens:
            raise ctx.error(
                f"cross-score under {model!r} is marked aligned but its tokens differ from the "
                "response's tokens",
                "set aligned: false (different tokenizer) or re-score the response's own tokens",
            )
        cross[model] = CrossScore(aligned=aligned, scores=cs)
    return Response(text, finish, scores, cross, reason)


def _prompt_text(v: Any, ctx: Ctx) -> str:
    if isinstance(v, str):
        return v
    if isinstance(v, list) and all(isinstance(m, dict) for m in v):  # chat messages
        return "\n".join(f"{m.get('role', '?')}: {m.get('content', '')}" for m in v)
    raise ctx.error(f"prompt is {type(v).__name__}, expected a string", FIX_SHAPE)


def parse_record(raw: Any, i: int, path: Path, vocab: TokenVocab) -> PromptSamples:
    ctx = Ctx(path, i)
    raw = _dict(raw, "the record", ctx)
    if "prompt" not in raw or "responses" not in raw:
        missing = [k for k in ("prompt", "responses") if k not in raw]
        raise ctx.error(f"missing key(s) {missing}", FIX_SHAPE)
    prompt = _prompt_text(raw["prompt"], ctx)
    model = raw.get("model")
    model = _str(model, "model", ctx) if model is not None else path.stem
    category = raw.get("category")
    if category is not None:
        category = _str(category, "category", ctx)
    responses_raw = _list(raw["responses"], "responses", ctx)
    if not responses_raw:
        raise ctx.error(
            f"no responses for prompt {shorten(prompt)!r} (the provider returned nothing)",
            "re-sample this prompt, or drop the record from both files",
        )
    responses = []
    for j, r in enumerate(responses_raw):
        responses.append(_parse_response(r, Ctx(path, i, j), vocab))
    index = raw.get("index", i)
    if type(index) is not int or not 0 <= index < 2**31:
        raise ctx.error(
            f"index must be an integer in [0, 2**31), not {shorten(repr(index))}", FIX_SHAPE
        )
    return PromptSamples(index, prompt, model, responses, category)


def shorten(s: str, n: int = 60) -> str:
    return s if len(s) <= n else s[: n - 3] + "..."
