"""Sample files: sampled responses with per-token logprobs, read into arrays.

Three formats are read, all into the same in-memory shape (:class:`SampleSet`):

* the legacy pickle: a list of ``{prompt, model, responses}`` where each response is an
  OpenAI ``chat.completion`` dict (read with :func:`divscope.safe_pickle.safe_load_pickle`);
* OpenRouter JSON: a JSON list of the same records (tokens may carry ``bytes``);
* divscope JSONL: one record per prompt, responses stored column-wise (see :data:`FORMAT`),
  optionally with tokenizer ids, byte offsets and cross-scores under other models.

Per response, positions are held as arrays: ``ids (T,)`` interned token ids, ``logprobs (T,)``,
``top_ids (T, K)`` padded with -1 and ``top_logprobs (T, K)`` padded with -inf. Token strings
are interned in a :class:`TokenVocab` shared by the files that are compared, so metrics compare
integers instead of walking dicts.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from divscope.errors import SampleFileError
from divscope.safe_pickle import safe_load_pickle

FORMAT = "divscope.samples/1"
# API logprobs are rounded floats; a log-probability a little above 0 is rounding, 0.5 is not.
_LOGPROB_TOLERANCE = 1e-3


class TokenVocab:
    """Interns token strings as integers; share one between the files you compare.

    Ids are unique but not contiguous (interning runs at C speed through ``dict.setdefault``
    with a counter); ``strings[id]`` maps an id back to its token.
    """

    def __init__(self) -> None:
        self._index: dict[str, int] = {}
        self._counter = itertools.count()
        self._strings: dict[int, str] = {}

    def __len__(self) -> int:
        return len(self._index)

    def ids(self, tokens: list[str]) -> np.ndarray:
        """Return the ids of ``tokens`` as an int64 array of shape ``(len(tokens),)``."""
        ids = list(map(self._index.setdefault, tokens, self._counter))
        return np.array(ids, dtype=np.int64).reshape(len(tokens))

    @property
    def strings(self) -> dict[int, str]:
        """Id -> token string."""
        if len(self._strings) != len(self._index):
            self._strings = {v: k for k, v in self._index.items()}
        return self._strings


@dataclass
class TokenScores:
    """Per-position log-probabilities of a token sequence under one model.

    Attributes:
        tokens: Token strings, length T.
        ids: Interned token ids, shape ``(T,)``.
        logprobs: Log-probability of each token, shape ``(T,)``; NaN where the server gave none.
        top_ids: Interned ids of the top-k alternatives, shape ``(T, K)``, -1 padded.
        top_logprobs: Their log-probabilities, shape ``(T, K)``, -inf padded; float64, or
            float32 when read from a packed file that stored them so (exact values; widen
            before arithmetic).
        token_ids: Tokenizer ids where the server gave them, else None.
        byte_offsets: Byte offset of each token in the text where known, else None.
    """

    tokens: list[str]
    ids: np.ndarray
    logprobs: np.ndarray
    top_ids: np.ndarray
    top_logprobs: np.ndarray
    token_ids: np.ndarray | None = None
    byte_offsets: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def n_missing(self) -> int:
        """Positions without a log-probability."""
        return int(np.isnan(self.logprobs).sum())


@dataclass
class CrossScore:
    """Another model's log-probabilities of a response.

    ``aligned`` means the scores are for this response's own tokens, position by position
    (same tokenizer); otherwise ``scores`` holds the other model's own tokenisation of the
    same text and only the sequence total is comparable (per byte).
    """

    aligned: bool
    scores: TokenScores


@dataclass
class Response:
    """One sampled response.

    Attributes:
        text: The response text.
        finish_reason: As reported by the server.
        scores: The generating model's per-token log-probabilities, or None when missing.
        cross: Cross-scores by model name.
        excluded_reason: Why the response cannot be scored (None when it can).
    """

    text: str
    finish_reason: str | None
    scores: TokenScores | None
    cross: dict[str, CrossScore] = field(default_factory=dict)
    excluded_reason: str | None = None

    @property
    def n_bytes(self) -> int:
        """UTF-8 length of the text."""
        return len(self.text.encode("utf-8"))


@dataclass
class PromptSamples:
    """All responses of one model to one prompt."""

    index: int
    prompt: str
    model: str
    responses: list[Response]
    category: str | None = None

    @property
    def usable(self) -> list[Response]:
        """Responses that carry log-probabilities."""
        return [r for r in self.responses if r.excluded_reason is None]


@dataclass
class SampleSet:
    """A whole sample file: one model, one record per prompt."""

    path: Path
    model: str
    records: list[PromptSamples]
    vocab: TokenVocab
    source_format: str

    @property
    def n_excluded(self) -> int:
        """Responses excluded for missing log-probabilities, over all records."""
        return sum(len(r.responses) - len(r.usable) for r in self.records)

    def has_cross_scores(self, other_model: str) -> bool:
        """Whether every usable response carries a cross-score under ``other_model``."""
        usable = [resp for rec in self.records for resp in rec.usable]
        return bool(usable) and all(other_model in resp.cross for resp in usable)


# ---------------------------------------------------------------------------- validation


class _Ctx:
    """Where we are in a file, for error messages."""

    def __init__(self, path: Path, record: int | None = None, response: int | None = None):
        self.path, self.record, self.response = path, record, response

    def error(self, problem: str, fix: str, token: int | None = None) -> SampleFileError:
        return SampleFileError(
            self.path, problem, fix, record=self.record, response=self.response, token=token
        )


_FIX_SHAPE = (
    "each record must be {prompt, model, responses}; each response an OpenAI chat.completion "
    "with choices[0].logprobs.content[*].{token, logprob, top_logprobs}, or divscope JSONL"
)


def _logprob(v: Any, ctx: _Ctx, token: int | None, allow_none: bool = False) -> float:
    if v is None and allow_none:
        return math.nan
    if type(v) not in (float, int):
        raise ctx.error(f"logprob {v!r} is not a number", _FIX_SHAPE, token)
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


def _str(v: Any, what: str, ctx: _Ctx, token: int | None = None) -> str:
    if not isinstance(v, str):
        raise ctx.error(f"{what} is {type(v).__name__}, expected a string", _FIX_SHAPE, token)
    return v


def _list(v: Any, what: str, ctx: _Ctx, token: int | None = None) -> list:
    if not isinstance(v, list | tuple):
        raise ctx.error(f"{what} is {type(v).__name__}, expected a list", _FIX_SHAPE, token)
    return list(v)


def _dict(v: Any, what: str, ctx: _Ctx, token: int | None = None) -> dict:
    if not isinstance(v, dict):
        raise ctx.error(f"{what} is {type(v).__name__}, expected an object", _FIX_SHAPE, token)
    return v


def _int_array(v: Any, n: int, what: str, ctx: _Ctx) -> np.ndarray | None:
    if v is None:
        return None
    values = _list(v, what, ctx)
    if len(values) != n or not set(map(type, values)) <= {int}:
        raise ctx.error(f"{what} must be {n} integers", _FIX_SHAPE)
    return np.asarray(values, dtype=np.int64).reshape(n)


_NUMBER = {float, int}
_NUMBER_OR_NONE = {float, int, type(None)}


def _logprob_array(
    values: list, ctx: _Ctx, allow_none: bool, token: int | None = None
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
    top_tokens: list, top_lps: list, vocab: TokenVocab, ctx: _Ctx
) -> tuple[np.ndarray, np.ndarray]:
    """Rows of top-k tokens / logprobs -> ``(T, K)`` ids (-1 padded) and logprobs (-inf)."""
    n = len(top_tokens)
    if len(top_lps) != n:
        raise ctx.error(f"top_tokens/top_logprobs must have one list per token ({n})", _FIX_SHAPE)
    if not set(map(type, top_tokens)) | set(map(type, top_lps)) <= {list, tuple}:
        bad = next(
            i
            for i in range(n)
            if type(top_tokens[i]) not in (list, tuple) or type(top_lps[i]) not in (list, tuple)
        )
        raise ctx.error("a top-k entry is not a list", _FIX_SHAPE, bad)
    lens = np.fromiter(map(len, top_tokens), dtype=np.int64, count=n)
    if not np.array_equal(lens, np.fromiter(map(len, top_lps), dtype=np.int64, count=n)):
        bad = int(np.flatnonzero(lens != np.fromiter(map(len, top_lps), np.int64, n))[0])
        raise ctx.error("top_tokens and top_logprobs differ in length", _FIX_SHAPE, bad)
    k = int(lens.max()) if n else 0
    flat_tokens = list(itertools.chain.from_iterable(top_tokens))
    if not set(map(type, flat_tokens)) <= {str}:
        bad = next(i for i, row in enumerate(top_tokens) if not set(map(type, row)) <= {str})
        raise ctx.error("a top-k token is not a string", _FIX_SHAPE, bad)
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


def _scores_from_openai(content: Any, ctx: _Ctx, vocab: TokenVocab) -> TokenScores:
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


def _scores_from_columns(d: Any, ctx: _Ctx, vocab: TokenVocab) -> TokenScores:
    """Parse divscope's column-wise ``{tokens, logprobs, top_tokens, top_logprobs, ...}``."""
    d = _dict(d, "logprobs", ctx)
    tokens = _list(d.get("tokens"), "tokens", ctx)
    if not set(map(type, tokens)) <= {str}:
        bad = next(i for i, t in enumerate(tokens) if type(t) is not str)
        raise ctx.error(
            f"token is {type(tokens[bad]).__name__}, expected a string", _FIX_SHAPE, bad
        )
    n = len(tokens)
    lps = _list(d.get("logprobs"), "logprobs.logprobs", ctx)
    if len(lps) != n:
        raise ctx.error(f"{len(lps)} logprobs for {n} tokens", _FIX_SHAPE)
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


def exclusion_reason(scores: TokenScores) -> str | None:
    """Why a response with these scores cannot be scored, or None when it can."""
    if len(scores) == 0:
        return "empty response (no tokens)"
    if scores.n_missing:
        return f"{scores.n_missing} of {len(scores)} tokens have no logprob"
    return None


def _parse_response(raw: Any, ctx: _Ctx, vocab: TokenVocab) -> Response:
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
        scores = _scores_from_columns(lp, ctx, vocab) if lp is not None else None
        cross_raw = raw.get("cross_scores")
        if raw.get("error"):
            return Response(text, None, None, excluded_reason=f"error: {raw['error']}")
    if finish is not None and not isinstance(finish, str):
        raise ctx.error("finish_reason must be a string", _FIX_SHAPE)
    reason = "no logprobs in the response" if scores is None else exclusion_reason(scores)
    cross: dict[str, CrossScore] = {}
    for model, c in _dict(cross_raw or {}, "cross_scores", ctx).items():
        c = _dict(c, f"cross_scores[{model!r}]", ctx)
        cs = _scores_from_columns(c, ctx, vocab)
        aligned = bool(c.get("aligned", False))
        if aligned and scores is not None and cs.tokens != scores.tokens:
            raise ctx.error(
                f"cross-score under {model!r} is marked aligned but its tokens differ from the "
                "response's tokens",
                "set aligned: false (different tokenizer) or re-score the response's own tokens",
            )
        cross[model] = CrossScore(aligned=aligned, scores=cs)
    return Response(text, finish, scores, cross, reason)


def _prompt_text(v: Any, ctx: _Ctx) -> str:
    if isinstance(v, str):
        return v
    if isinstance(v, list) and all(isinstance(m, dict) for m in v):  # chat messages
        return "\n".join(f"{m.get('role', '?')}: {m.get('content', '')}" for m in v)
    raise ctx.error(f"prompt is {type(v).__name__}, expected a string", _FIX_SHAPE)


def _parse_record(raw: Any, i: int, path: Path, vocab: TokenVocab) -> PromptSamples:
    ctx = _Ctx(path, i)
    raw = _dict(raw, "the record", ctx)
    if "prompt" not in raw or "responses" not in raw:
        missing = [k for k in ("prompt", "responses") if k not in raw]
        raise ctx.error(f"missing key(s) {missing}", _FIX_SHAPE)
    prompt = _prompt_text(raw["prompt"], ctx)
    model = raw.get("model")
    model = _str(model, "model", ctx) if model is not None else path.stem
    category = raw.get("category")
    if category is not None:
        category = _str(category, "category", ctx)
    responses_raw = _list(raw["responses"], "responses", ctx)
    if not responses_raw:
        raise ctx.error(
            f"no responses for prompt {_short(prompt)!r} (the provider returned nothing)",
            "re-sample this prompt, or drop the record from both files",
        )
    responses = []
    for j, r in enumerate(responses_raw):
        responses.append(_parse_response(r, _Ctx(path, i, j), vocab))
    index = raw.get("index", i)
    if type(index) is not int:
        raise ctx.error("index must be an integer", _FIX_SHAPE)
    return PromptSamples(index, prompt, model, responses, category)


def _short(s: str, n: int = 60) -> str:
    return s if len(s) <= n else s[: n - 3] + "..."


# ---------------------------------------------------------------------------- reading


def _json_constant(name: str) -> float:
    # NaN / Infinity / -Infinity are not JSON but Python writes them; validation rejects NaN/+inf.
    return {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}[name]


def _sniff(path: Path, head: bytes) -> str:
    suffix = path.suffix.lower()
    if suffix in (".pkl", ".pickle"):
        return "pickle"
    if suffix == ".jsonl":
        return "jsonl"
    if suffix == ".json":
        return "json"
    if head[:1] == b"\x80":
        return "pickle"
    stripped = head.lstrip()
    if stripped[:1] == b"[":
        return "json"
    if stripped[:1] == b"{":
        return "jsonl"
    raise SampleFileError(
        path,
        "cannot tell the format (not a pickle, a JSON list or JSONL)",
        "name the file .pkl, .json or .jsonl",
    )


def _read_raw_records(path: Path) -> tuple[Iterable[Any], str]:
    """The file's raw records and its format; JSONL records are parsed lazily, line by line."""
    if not path.exists():
        raise SampleFileError(path, "no such file", "check the path")
    if path.is_dir():
        raise SampleFileError(path, "is a directory", "give a sample file (.pkl, .json, .jsonl)")
    with path.open("rb") as f:
        head = f.read(64)
    if not head.strip():
        raise SampleFileError(path, "the file is empty", "re-create it with the sampler")
    fmt = _sniff(path, head)
    if fmt == "pickle":
        obj = safe_load_pickle(path)
        return _top_list(obj, path), fmt
    if fmt == "jsonl":
        return _jsonl_records(path), fmt
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise SampleFileError(path, f"not UTF-8 text ({e})", "re-create the file") from e
    try:
        obj = json.loads(text, parse_constant=_json_constant)
    except (json.JSONDecodeError, RecursionError) as e:
        raise SampleFileError(
            path, f"truncated or corrupt JSON ({e})", "re-copy or re-create the file"
        ) from e
    return _top_list(obj, path), fmt


def _jsonl_records(path: Path) -> Iterator[Any]:
    """Parse a JSONL file one line at a time (memory holds one raw record, not the file)."""
    n = 0
    with path.open(encoding="utf-8", newline="\n") as f:
        lineno = 0
        while True:
            try:
                line = f.readline()
            except UnicodeDecodeError as e:
                raise SampleFileError(
                    path, f"not UTF-8 text ({e})", "re-create the file", record=n
                ) from e
            if not line:
                return
            lineno += 1
            if not line.strip():
                continue
            try:
                raw = json.loads(line, parse_constant=_json_constant)
            except (json.JSONDecodeError, RecursionError) as e:
                raise SampleFileError(
                    path,
                    f"line {lineno} (record {n}) is truncated or corrupt JSON ({e})",
                    "re-run the sampler on the same config to resume (it rewrites incomplete "
                    "records), or delete the broken line",
                    record=n,
                ) from e
            n += 1
            yield raw


def _top_list(obj: Any, path: Path) -> list[Any]:
    if not isinstance(obj, list):
        raise SampleFileError(
            path, f"the top level is a {type(obj).__name__}, expected a list of records", _FIX_SHAPE
        )
    return obj


def load_samples(path: str | Path, vocab: TokenVocab | None = None) -> SampleSet:
    """Read a sample file (legacy pickle, OpenRouter JSON, divscope JSONL or packed ``.npz``).

    Args:
        path: The file.
        vocab: Token vocabulary to intern into; share one between files you compare.

    Returns:
        The file's records as arrays.

    Raises:
        SampleFileError: The file is missing, truncated, corrupt, holds NaN or +inf
            logprobs, a record without responses, or mixes models.
    """
    from divscope.gcpause import paused_gc

    with paused_gc():
        return _load_samples(Path(path), vocab)


def _load_samples(path: Path, vocab: TokenVocab | None) -> SampleSet:
    path = Path(path)
    vocab = vocab if vocab is not None else TokenVocab()
    if path.is_file():
        from divscope.packed import is_packed, read_samples_packed

        with path.open("rb") as f:
            head = f.read(4)
        if is_packed(path, head):
            return _checked(path, read_samples_packed(path, vocab).records, vocab, "packed")
    raws, fmt = _read_raw_records(path)
    records = []
    n = n_empty = 0
    first_empty: SampleFileError | None = None
    for i, raw in enumerate(raws):
        n += 1
        if isinstance(raw, dict) and raw.get("responses") == []:
            # reported once we know whether every record is empty (a failed run) or not
            n_empty += 1
            if first_empty is None:
                try:
                    _parse_record(raw, i, path, vocab)
                except SampleFileError as e:
                    first_empty = e
            continue
        if first_empty is not None:
            raise first_empty
        try:
            records.append(_parse_record(raw, i, path, vocab))
        except SampleFileError:
            raise
        except (RecursionError, MemoryError, OverflowError) as e:
            raise SampleFileError(path, f"unreadable record ({e})", _FIX_SHAPE, record=i) from e
    if n == 0:
        raise SampleFileError(path, "the file holds no records", "re-create it with the sampler")
    if n_empty == n:
        raise SampleFileError(
            path,
            f"all {n} records have no responses: the sampling run came back empty",
            "check the provider, model name and API key, then re-sample",
        )
    if first_empty is not None:
        raise first_empty
    return _checked(path, records, vocab, fmt)


def _checked(path: Path, records: list[PromptSamples], vocab: TokenVocab, fmt: str) -> SampleSet:
    """Records in prompt order, one index each and one model, as a :class:`SampleSet`."""
    if fmt in ("jsonl", "packed"):  # appended as prompts finished: put them back in order
        seen: dict[int, int] = {}
        for i, r in enumerate(records):
            if r.index in seen:
                raise SampleFileError(
                    path,
                    f"prompt index {r.index} appears twice (records {seen[r.index]} and {i})",
                    "keep one record per prompt (re-run the sampler to repair the file)",
                    record=i,
                )
            seen[r.index] = i
        records.sort(key=lambda r: r.index)
    models = {r.model for r in records}
    if len(models) > 1:
        first = records[0].model
        bad = next(r for r in records if r.model != first)
        raise SampleFileError(
            path,
            f"mixes models ({first!r} in record 0, {bad.model!r} in record {bad.index})",
            "keep one model per sample file",
            record=bad.index,
        )
    return SampleSet(path, records[0].model, records, vocab, fmt)


def load_pair(path_a: str | Path, path_b: str | Path) -> tuple[SampleSet, SampleSet]:
    """Read two sample files on the same prompts, sharing one vocabulary.

    Raises:
        SampleFileError: Either file is bad, or their prompts differ (the message names the
            first differing index and both prompts).
    """
    vocab = TokenVocab()
    a = load_samples(path_a, vocab)
    b = load_samples(path_b, vocab)
    check_same_prompts(a, b)
    return a, b


def check_same_prompts(a: SampleSet, b: SampleSet) -> None:
    """Raise :class:`SampleFileError` unless ``a`` and ``b`` hold the same prompts in order."""
    for i, (ra, rb) in enumerate(zip(a.records, b.records, strict=False)):
        if ra.prompt != rb.prompt:
            raise SampleFileError(
                b.path,
                f"prompt {i} differs from {a.path.name}: {_short(ra.prompt)!r} vs "
                f"{_short(rb.prompt)!r}",
                "sample both models on the same prompt list, in the same order",
                record=i,
            )
    if len(a.records) != len(b.records):
        longer, shorter = (a, b) if len(a.records) > len(b.records) else (b, a)
        i = len(shorter.records)
        raise SampleFileError(
            longer.path,
            f"has {len(longer.records)} prompts, {shorter.path.name} has {len(shorter.records)}; "
            f"prompt {i} {_short(longer.records[i].prompt)!r} has no counterpart",
            "sample both models on the same prompt list",
            record=i,
        )


# ---------------------------------------------------------------------------- writing


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
    from divscope.runmeta import atomic_write_text

    lines = [
        # -inf (probability 0) is written as -Infinity, which load_samples reads back.
        json.dumps(record_to_json(r, samples.vocab), ensure_ascii=False)
        for r in samples.records
    ]
    return atomic_write_text(Path(path), "\n".join(lines) + "\n", overwrite=overwrite)
