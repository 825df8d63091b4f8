"""The packed sample format: a whole sample file as flat arrays in one ``.npz``.

JSONL is what the sampler appends as it goes (resumable, readable); parsing it costs about
24 s per file of 1,000 prompts x 5 samples x 200 tokens x top-20 (2 CPU cores).
``divscope convert A.jsonl A.npz`` writes the same content packed, which loads in well under
a second and is what ``divscope rank`` should be pointed at for large runs. The file is an
uncompressed NumPy ``.npz`` read with ``allow_pickle=False`` (nothing in it can run code):

* ``meta``: UTF-8 JSON as ``uint8`` — ``{format, model, source, strings, blocks, records}``.
  ``strings`` is the token string table; ``blocks`` names the score blocks (``own`` for the
  generating model, then one per cross-scoring model); each record holds its prompt, index,
  category and responses ``{text, finish_reason, excluded_reason, error, own, cross}`` where
  ``own`` is ``[start, length]`` into the ``own`` block (or null) and ``cross`` maps a model to
  ``{block, start, length, aligned}``; ``token_ids`` / ``byte_offsets`` flags say whether
  those optional columns hold data for the response.
* per block ``b``: ``b.ids (N,) int32`` string-table ids, ``b.logprobs (N,)`` (NaN where the
  server gave none), ``b.top_ids (N, K) int32`` (-1 padded), ``b.top_logprobs (N, K)`` (-inf
  padded), ``b.token_ids (N,) int64`` and ``b.byte_offsets (N,) int64``. Logprobs are stored
  as float32 when that is lossless (the sampler writes float32 values; servers compute in
  float32) and as float64 otherwise. In memory ``logprobs`` are float64 and ``top_logprobs``
  keep the stored dtype (exact either way; consumers widen them before arithmetic), which
  saves 640 MB of fresh memory on a 1,000-prompt pair.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from divscope.bounded import ArrayFileError, json_int, open_npz
from divscope.samples.errors import SampleFileError
from divscope.samples.records import (
    _LOGPROB_TOLERANCE,
    CrossScore,
    PromptSamples,
    Response,
    SampleSet,
    TokenScores,
    TokenVocab,
    exclusion_reason,
)

PACKED_FORMAT = "divscope.samples-packed/1"
_FLOATS = (np.float32, np.float64)
_FIX = "re-create it with `divscope convert SAMPLES.jsonl SAMPLES.npz`"


class _Block:
    """Accumulates the positions of one score block while writing."""

    def __init__(self) -> None:
        self.parts: list[TokenScores] = []
        self.size = 0

    def add(self, s: TokenScores) -> list[int]:
        span = [self.size, len(s)]
        self.parts.append(s)
        self.size += len(s)
        return span

    def arrays(self, name: str, local: np.ndarray) -> dict[str, np.ndarray]:
        k = max((s.top_ids.shape[1] for s in self.parts), default=0)
        n = self.size
        out = {
            "ids": np.zeros(n, np.int32),
            "logprobs": np.zeros(n, np.float64),
            "top_ids": np.full((n, k), -1, np.int32),
            "top_logprobs": np.full((n, k), -np.inf, np.float64),
            "token_ids": np.zeros(n, np.int64),
            "byte_offsets": np.zeros(n, np.int64),
        }
        at = 0
        for s in self.parts:
            m, kk = len(s), s.top_ids.shape[1]
            out["ids"][at : at + m] = local[s.ids]
            out["logprobs"][at : at + m] = s.logprobs
            out["top_ids"][at : at + m, :kk] = local[s.top_ids]  # -1 (padding) reads -1
            out["top_logprobs"][at : at + m, :kk] = s.top_logprobs
            if s.token_ids is not None:
                out["token_ids"][at : at + m] = s.token_ids
            if s.byte_offsets is not None:
                out["byte_offsets"][at : at + m] = s.byte_offsets
            at += m
        for key in ("logprobs", "top_logprobs"):
            narrow = out[key].astype(np.float32)
            if np.array_equal(narrow.astype(np.float64), out[key], equal_nan=True):
                out[key] = narrow  # lossless: half the bytes to read back
        return {f"{name}.{k}": v for k, v in out.items()}


def write_samples_packed(samples: SampleSet, path: str | Path, *, overwrite: bool = False) -> Path:
    """Write ``samples`` as a packed ``.npz``, atomically.

    Raises:
        FileExistsError: ``path`` exists and ``overwrite`` is False.
    """
    from divscope.runmeta import atomic_write, json_text

    strings = samples.vocab.strings
    used = sorted(strings)  # vocab ids -> a dense local table; its last entry stays -1
    local = np.full(max(used, default=-1) + 2, -1, np.int64)
    local[used] = np.arange(len(used))
    blocks: dict[str, _Block] = {"own": _Block()}
    records = []
    for rec in samples.records:
        responses = []
        for r in rec.responses:
            out: dict[str, Any] = {
                "text": r.text,
                "finish_reason": r.finish_reason,
                "excluded_reason": r.excluded_reason,
                "own": None,
                "cross": {},
            }
            if r.scores is not None:
                out["own"] = blocks["own"].add(r.scores)
                out["token_ids"] = r.scores.token_ids is not None
                out["byte_offsets"] = r.scores.byte_offsets is not None
            for model, c in r.cross.items():
                block = blocks.setdefault(model, _Block())
                start, length = block.add(c.scores)
                out["cross"][model] = {
                    "block": list(blocks).index(model),
                    "start": start,
                    "length": length,
                    "aligned": c.aligned,
                    "token_ids": c.scores.token_ids is not None,
                    "byte_offsets": c.scores.byte_offsets is not None,
                }
            responses.append(out)
        records.append(
            {
                "index": rec.index,
                "prompt": rec.prompt,
                "model": rec.model,
                "category": rec.category,
                "responses": responses,
            }
        )
    meta = {
        "format": PACKED_FORMAT,
        "model": samples.model,
        "source": {"path": str(samples.path), "format": samples.source_format},
        "strings": [strings[i] for i in used],
        "blocks": list(blocks),
        "records": records,
    }
    arrays = {"meta": np.frombuffer(json_text(meta).encode(), np.uint8)}
    for i, block in enumerate(blocks.values()):
        arrays.update(block.arrays(f"b{i}", local))
    return atomic_write(Path(path), lambda f: np.savez(f, **arrays), overwrite=overwrite)


# ---------------------------------------------------------------------------- reading


def is_packed(path: Path, head: bytes) -> bool:
    """Whether ``path`` is (meant to be) a packed sample file."""
    return path.suffix.lower() == ".npz" or head[:4] == b"PK\x03\x04"


def _array(z: Any, key: str, path: Path, dtype: type | tuple[type, ...], ndim: int) -> np.ndarray:
    if key not in z.files:
        raise SampleFileError(path, f"array {key!r} is missing", _FIX)
    try:
        a = z[key]
    except Exception as e:  # noqa: BLE001 - a corrupt .npy fails in many ways (header parsing, zip, zlib)
        raise SampleFileError(path, f"array {key!r} is unreadable ({e!r})", _FIX) from e
    dtypes = dtype if isinstance(dtype, tuple) else (dtype,)
    if a.dtype not in dtypes or a.ndim != ndim:
        names = " or ".join(d.__name__ for d in dtypes)
        raise SampleFileError(
            path, f"array {key!r} is {a.dtype} with {a.ndim} dims, expected {names}", _FIX
        )
    return a


class _Locator:
    """Maps a flat position of a block back to (record, response, token) for errors."""

    def __init__(self, spans: list[tuple[int, int, int, int]]) -> None:
        self.spans = sorted(spans, key=lambda s: s[2])  # (record, response, start, length)
        self.starts = np.array([s[2] for s in self.spans], dtype=np.int64)

    def where(self, flat: int) -> dict[str, int | None]:
        if not self.spans:
            return {"record": None}
        i = int(np.searchsorted(self.starts, flat, side="right")) - 1
        rec, resp, start, _ = self.spans[max(i, 0)]
        return {"record": rec, "response": resp, "token": int(flat - start)}


def _check_block(
    path: Path, name: str, a: dict[str, np.ndarray], n_strings: int, loc: _Locator
) -> None:
    n = len(a["ids"])
    for key in ("logprobs", "top_ids", "top_logprobs", "token_ids", "byte_offsets"):
        if len(a[key]) != n:
            raise SampleFileError(
                path, f"block {name}: {key} has {len(a[key])} rows, not {n}", _FIX
            )
    if a["top_ids"].shape != a["top_logprobs"].shape:
        raise SampleFileError(path, f"block {name}: top_ids and top_logprobs differ in shape", _FIX)

    def fail(bad: np.ndarray, problem: str, fix: str = _FIX) -> None:
        flat = int(np.flatnonzero(bad.reshape(n, -1).any(1))[0])
        raise SampleFileError(path, f"block {name}: {problem}", fix, **loc.where(flat))

    for key, low in (("ids", 0), ("top_ids", -1)):
        x = a[key]
        if x.size and (x.min() < low or x.max() >= n_strings):
            fail(
                (x < low) | (x >= n_strings), f"{key} outside the string table (0..{n_strings - 1})"
            )
    lp = a["logprobs"]
    if (lp > _LOGPROB_TOLERANCE).any():  # NaN is allowed here: the server gave no logprob
        fail(lp > _LOGPROB_TOLERANCE, "a logprob is above 0")
    rows = max(1, 2**20 // max(1, a["top_ids"].shape[1]))  # small temporaries, reused memory
    for r0 in range(0, n, rows):
        top, top_ids = a["top_logprobs"][r0 : r0 + rows], a["top_ids"][r0 : r0 + rows]
        bad_top = ~(top <= _LOGPROB_TOLERANCE)  # NaN compares False: caught here too
        bad_top |= (top_ids < 0) & (top != -np.inf)
        if bad_top.any():
            bad = np.zeros((n, 1), dtype=bool)
            bad[r0 : r0 + rows] = bad_top.any(1, keepdims=True)
            fail(bad, "a top-k logprob is NaN, above 0, or set where there is no token")


def read_samples_packed(path: str | Path, vocab: TokenVocab | None = None) -> SampleSet:
    """Read a packed sample file written by :func:`write_samples_packed`.

    Raises:
        SampleFileError: The file is not a packed sample file, is truncated or corrupt, or its
            arrays disagree with its records (the message names the record and response).
    """
    path = Path(path)
    vocab = vocab if vocab is not None else TokenVocab()
    try:
        z = open_npz(path)
    except ArrayFileError as e:
        raise SampleFileError(path, e.problem, _FIX) from e
    except Exception as e:  # noqa: BLE001 - a corrupt file fails in many ways; all mean "corrupt"
        raise SampleFileError(path, f"not a readable .npz ({e!r})", _FIX) from e
    if not hasattr(z, "files"):
        raise SampleFileError(path, "holds a single array, not a packed sample file", _FIX)
    with z:
        text = _array(z, "meta", path, np.uint8, 1).tobytes()
        try:  # ValueError: not UTF-8, not JSON, an integer of thousands of digits
            meta = json.loads(text.decode("utf-8"), parse_int=json_int)
        except (ValueError, RecursionError) as e:
            raise SampleFileError(path, f"the meta record is corrupt ({e})", _FIX) from e
        if not isinstance(meta, dict) or meta.get("format") != PACKED_FORMAT:
            got = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
            raise SampleFileError(path, f"format is {got!r}, expected {PACKED_FORMAT!r}", _FIX)
        return _build(path, z, meta, vocab)


def _meta_error(path: Path, what: str, i: int | None = None, j: int | None = None):
    return SampleFileError(path, f"meta record: {what}", _FIX, record=i, response=j)


def _typed(v: Any, types: tuple[type, ...], what: str, path: Path, i: int, j: int | None = None):
    if type(v) not in types:
        names = " or ".join("null" if t is type(None) else t.__name__ for t in types)
        raise _meta_error(path, f"{what} is {type(v).__name__}, expected {names}", i, j)
    return v


def _span(v: Any, what: str, path: Path, i: int, j: int) -> tuple[int, int]:
    if not (isinstance(v, list) and len(v) == 2 and all(type(x) is int for x in v)):
        raise _meta_error(path, f"{what} must be [start, length]", i, j)
    if not all(0 <= x < 2**62 for x in v):
        raise _meta_error(path, f"{what} {v} is out of range", i, j)
    return v[0], v[1]


def _records_meta(path: Path, meta: dict[str, Any], n_blocks: int) -> list[dict[str, Any]]:
    """Type-check the records of the meta record (each error names record and response)."""
    records = meta.get("records")
    if not isinstance(records, list) or not records:
        raise SampleFileError(path, "the file holds no records", "re-create it with the sampler")
    for i, rec in enumerate(records):
        _typed(rec, (dict,), "the record", path, i)
        if not 0 <= _typed(rec.get("index"), (int,), "index", path, i) < 2**31:
            raise _meta_error(path, "index is out of range [0, 2**31)", i)
        _typed(rec.get("prompt"), (str,), "prompt", path, i)
        _typed(rec.get("model"), (str,), "model", path, i)
        _typed(rec.get("category"), (str, type(None)), "category", path, i)
        responses = _typed(rec.get("responses"), (list,), "responses", path, i)
        if not responses:
            raise SampleFileError(
                path,
                "no responses for this prompt (the provider returned nothing)",
                "re-sample this prompt, or drop the record from both files",
                record=i,
            )
        for j, r in enumerate(responses):
            _typed(r, (dict,), "the response", path, i, j)
            _typed(r.get("text"), (str,), "text", path, i, j)
            for key in ("finish_reason", "excluded_reason"):
                _typed(r.get(key), (str, type(None)), key, path, i, j)
            for key in ("token_ids", "byte_offsets"):
                _typed(r.get(key, False), (bool,), key, path, i, j)
            if r.get("own") is not None:
                r["own"] = _span(r["own"], "own", path, i, j)
            for model, c in _typed(r.get("cross", {}), (dict,), "cross", path, i, j).items():
                _typed(c, (dict,), f"cross[{model!r}]", path, i, j)
                block = _typed(c.get("block"), (int,), "cross block", path, i, j)
                if not 1 <= block < n_blocks:
                    raise _meta_error(path, f"cross block {block} does not exist", i, j)
                _span([c.get("start"), c.get("length")], "cross start/length", path, i, j)
                for key in ("aligned", "token_ids", "byte_offsets"):
                    _typed(c.get(key, False), (bool,), f"cross {key}", path, i, j)
    return records


def _build(path: Path, z: Any, meta: dict[str, Any], vocab: TokenVocab) -> SampleSet:
    strings = meta.get("strings")
    if not isinstance(strings, list) or not all(isinstance(t, str) for t in strings):
        raise SampleFileError(path, "the string table is not a list of strings", _FIX)
    blocks = meta.get("blocks")
    if not isinstance(blocks, list) or not blocks or blocks[0] != "own":
        raise SampleFileError(path, "the block list must start with 'own'", _FIX)
    if not isinstance(meta.get("model"), str):
        raise SampleFileError(path, "the meta record names no model", _FIX)
    records_meta = _records_meta(path, meta, len(blocks))
    spans: list[list[tuple[int, int, int, int]]] = [[] for _ in blocks]
    for i, rec in enumerate(records_meta):
        for j, r in enumerate(rec["responses"]):
            if r.get("own") is not None:
                spans[0].append((i, j, *r["own"]))
            for c in r.get("cross", {}).values():
                spans[c["block"]].append((i, j, c["start"], c["length"]))
    arrays = []
    to_vocab = vocab.ids(strings)  # string-table id -> shared vocab id
    identity = bool(np.array_equal(to_vocab, np.arange(len(strings))))
    lookup = np.append(to_vocab, -1).astype(np.int32 if len(vocab) < 2**31 else np.int64)
    table = np.array(strings + [""], dtype=object)
    for b, name in enumerate(blocks):
        a = {
            "ids": _array(z, f"b{b}.ids", path, np.int32, 1),
            "logprobs": _array(z, f"b{b}.logprobs", path, _FLOATS, 1).astype(np.float64),
            "top_ids": _array(z, f"b{b}.top_ids", path, np.int32, 2),
            "top_logprobs": _array(z, f"b{b}.top_logprobs", path, _FLOATS, 2),
            "token_ids": _array(z, f"b{b}.token_ids", path, np.int64, 1),
            "byte_offsets": _array(z, f"b{b}.byte_offsets", path, np.int64, 1),
        }
        loc = _Locator(spans[b])
        for rec, resp, start, length in spans[b]:
            if start < 0 or length < 0 or start + length > len(a["ids"]):
                raise SampleFileError(
                    path,
                    f"block {name}: span [{start}, {start + length}) outside its "
                    f"{len(a['ids'])} positions",
                    _FIX,
                    record=rec,
                    response=resp,
                )
        _check_block(path, name, a, len(strings), loc)
        a["tokens"] = table[a["ids"]].tolist()
        if not identity:  # another file's table came first: map to the shared vocabulary
            a["ids"] = lookup[a["ids"]]
            a["top_ids"] = lookup[a["top_ids"]]  # -1 (padding) reads the last entry, -1
        arrays.append(a)

    def scores(b: int, start: int, length: int, flags: dict[str, Any]) -> TokenScores:
        a, part = arrays[b], slice(start, start + length)
        return TokenScores(
            tokens=a["tokens"][part],
            ids=a["ids"][part],
            logprobs=a["logprobs"][part],
            top_ids=a["top_ids"][part],
            top_logprobs=a["top_logprobs"][part],
            token_ids=a["token_ids"][part] if flags.get("token_ids") else None,
            byte_offsets=a["byte_offsets"][part] if flags.get("byte_offsets") else None,
        )

    records = []
    for rec in records_meta:
        responses = []
        for r in rec["responses"]:
            own = scores(0, *r["own"], r) if r.get("own") is not None else None
            reason = exclusion_reason(own) if own is not None else r.get("excluded_reason")
            cross = {
                m: CrossScore(
                    bool(c.get("aligned")), scores(c["block"], c["start"], c["length"], c)
                )
                for m, c in r.get("cross", {}).items()
            }
            responses.append(
                Response(
                    r["text"],
                    r.get("finish_reason"),
                    own,
                    cross,
                    reason or ("no logprobs in the response" if own is None else None),
                )
            )
        records.append(
            PromptSamples(rec["index"], rec["prompt"], rec["model"], responses, rec["category"])
        )
    return SampleSet(path, meta["model"], records, vocab, "packed")
