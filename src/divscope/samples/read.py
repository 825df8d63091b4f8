"""Reading sample files: legacy pickle, OpenRouter JSON, divscope JSONL and packed ``.npz``.

:func:`load_samples` tells the format from the file, reads its raw records (JSONL lazily, line by
line; pickles with the restricted unpickler), checks them into a :class:`SampleSet` in prompt
order, and :func:`load_pair` reads two files on the same prompts with one shared vocabulary.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from divscope.bounded import json_int
from divscope.gcpause import paused_gc
from divscope.samples.errors import SampleFileError
from divscope.samples.packed import is_packed, read_samples_packed
from divscope.samples.parse import FIX_SHAPE, parse_record, shorten
from divscope.samples.records import PromptSamples, SampleSet, TokenVocab
from divscope.samples.safe_pickle import safe_load_pickle


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
        obj = json.loads(text, parse_constant=_json_constant, parse_int=json_int)
    except (ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError
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
                raw = json.loads(line, parse_constant=_json_constant, parse_int=json_int)
            except (ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError
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
            path, f"the top level is a {type(obj).__name__}, expected a list of records", FIX_SHAPE
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
    with paused_gc():
        return _load_samples(Path(path), vocab)


def _load_samples(path: Path, vocab: TokenVocab | None) -> SampleSet:
    path = Path(path)
    vocab = vocab if vocab is not None else TokenVocab()
    if path.is_file():
        with path.open("rb") as f:
            head = f.read(4)
        if is_packed(path, head):
            return checked_set(path, read_samples_packed(path, vocab).records, vocab, "packed")
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
                    parse_record(raw, i, path, vocab)
                except SampleFileError as e:
                    first_empty = e
            continue
        if first_empty is not None:
            raise first_empty
        try:
            records.append(parse_record(raw, i, path, vocab))
        except SampleFileError:
            raise
        except (RecursionError, MemoryError, OverflowError) as e:
            raise SampleFileError(path, f"unreadable record ({e})", FIX_SHAPE, record=i) from e
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
    return checked_set(path, records, vocab, fmt)


def checked_set(path: Path, records: list[PromptSamples], vocab: TokenVocab, fmt: str) -> SampleSet:
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
                f"prompt {i} differs from {a.path.name}: {shorten(ra.prompt)!r} vs "
                f"{shorten(rb.prompt)!r}",
                "sample both models on the same prompt list, in the same order",
                record=i,
            )
    if len(a.records) != len(b.records):
        longer, shorter = (a, b) if len(a.records) > len(b.records) else (b, a)
        i = len(shorter.records)
        raise SampleFileError(
            longer.path,
            f"has {len(longer.records)} prompts, {shorter.path.name} has {len(shorter.records)}; "
            f"prompt {i} {shorten(longer.records[i].prompt)!r} has no counterpart",
            "sample both models on the same prompt list",
            record=i,
        )
