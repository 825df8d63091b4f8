"""Writing a diff's run directory: ``ranking.json`` (the ``divscope rank --json`` contract),
``summary.json``, ``what_changed.json``, both sides' samples as divscope JSONL (token ids,
top-k logprobs, aligned cross-scores, and the exact per-position values under ``exact``) and
``metadata.json``; with ``--layers`` also ``layers.json``. Every file is checked for a clash
before anything is written, and ``ranking.json`` records each sample file's SHA-256
(``file_sha256``), which ``divscope report`` checks against the files beside it (a folder copied
or moved keeps working; a mismatch is refused). :func:`output_dir` holds the folder for one diff
at a time."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from divscope.diff.pipeline import DiffResult
from divscope.diff.samplefiles import columns, prompt_record, token_strings
from divscope.diff.score import SIDES
from divscope.runmeta import OutputError, atomic_write_json, atomic_write_text, dir_lock
from divscope.sampling.responses import f32

FILES = (
    "ranking.json",
    "summary.json",
    "what_changed.json",
    "samples_a.jsonl",
    "samples_b.jsonl",
    "metadata.json",
)


def sample_records(result: DiffResult, side: str, strings: list[str]) -> list[dict[str, Any]]:
    """Side ``side``'s samples as divscope JSONL records, cross-scored by the other side."""
    setup = result.setup
    other = "b" if side == "a" else "a"
    labels = {s: setup.conditions[s].label for s in SIDES}
    stops, decode = setup.stops[side], setup.tokenizers[side].decode
    records = []
    for i, p in enumerate(setup.prompts):
        sc = result.units[i].sides[side]
        cols = {k: sc.split(k) for k in ("lp_a", "lp_b", "top_ids_a", "top_lp_a", "top_ids_b",
                                          "top_lp_b", "kl_ab", "kl_ba", "js", "agree")}  # fmt: skip
        responses = []
        for r, ids in enumerate(result.responses[side][i]):
            own = columns(ids, cols[f"lp_{side}"][r], cols[f"top_ids_{side}"][r],
                           cols[f"top_lp_{side}"][r], strings)  # fmt: skip
            cross = columns(ids, cols[f"lp_{other}"][r], cols[f"top_ids_{other}"][r],
                             cols[f"top_lp_{other}"][r], strings)  # fmt: skip
            responses.append(
                {
                    "text": decode([t for t in ids if t not in stops]),
                    "finish_reason": "stop" if ids and ids[-1] in stops else "length",
                    "logprobs": own,
                    "cross_scores": {labels[other]: {"aligned": True, **cross}},
                    "exact": {
                        "kl_ab": f32(cols["kl_ab"][r].tolist()),
                        "kl_ba": f32(cols["kl_ba"][r].tolist()),
                        "js": f32(cols["js"][r].tolist()),
                        "same_top": cols["agree"][r].tolist(),
                    },
                }
            )
        records.append(prompt_record(p, labels[side], responses))
    return records


def check_clash(out: Path, *, overwrite: bool) -> None:
    """Refuse an ``out`` that is a file, or that holds a diff's outputs (unless ``overwrite``).

    Raises:
        OutputError: ``out`` is a file.
        FileExistsError: ``out`` holds outputs and ``overwrite`` is False.
    """
    if out.exists() and not out.is_dir():
        raise OutputError(out, "is a file, not a folder", "give a folder path for --out")
    clash = [f for f in (*FILES, "layers.json") if (out / f).exists()]
    if clash and not overwrite:
        raise FileExistsError(f"{out} already holds {clash}")


@contextmanager
def output_dir(out: str | Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Hold ``out`` for one diff from before its models load until its outputs are written:
    checked first (:func:`check_clash`), then locked (:func:`divscope.runmeta.dir_lock`), so a
    second diff on the same folder is refused at once instead of silently replacing the first
    one's files; a run that fails leaves no folder it created behind.

    Raises:
        OutputError: ``out`` is a file, or another diff holds it.
        FileExistsError: ``out`` holds outputs and ``overwrite`` is False.
    """
    out = Path(out)
    check_clash(out, overwrite=overwrite)
    busy = OutputError(
        out, "another divscope diff is writing to this folder",
        "wait for it to finish, or choose another --out",
    )  # fmt: skip
    with dir_lock(out, lambda: busy):
        check_clash(out, overwrite=overwrite)  # written while we waited for the lock
        yield out


def _sample_text(result: DiffResult, side: str, strings: list[str] | None) -> str:
    recs = result.records[side] if result.records else sample_records(result, side, strings)
    return "\n".join(json.dumps(r, ensure_ascii=False) for r in recs) + "\n"


def write_outputs(
    result: DiffResult, out_dir: str | Path, *, overwrite: bool = False
) -> dict[str, Path]:
    """Write the run directory (see the module doc); refuses, before writing anything, when a
    file exists and ``overwrite`` is False."""
    out = Path(out_dir)
    check_clash(out, overwrite=overwrite)
    stale = out / "layers.json"
    if result.layers is None and stale.exists():  # an earlier --layers run's, now overwritten
        stale.unlink()
    out.mkdir(parents=True, exist_ok=True)
    strings = None if result.records else token_strings(result.setup.tokenizers["a"])
    texts = {s: _sample_text(result, s, strings) for s in SIDES}
    written = {}
    doc = result.ranking.to_json()
    doc["files"] = [str(out / f"samples_{s}.jsonl") for s in SIDES]
    doc["file_sha256"] = [file_digest(texts[s]) for s in SIDES]
    written["ranking.json"] = atomic_write_json(out / "ranking.json", doc, overwrite=True)
    written["summary.json"] = atomic_write_json(
        out / "summary.json", result.summary, overwrite=True
    )
    written["what_changed.json"] = atomic_write_json(
        out / "what_changed.json", result.changed, overwrite=True
    )
    for side in SIDES:
        name = f"samples_{side}.jsonl"
        written[name] = atomic_write_text(out / name, texts[side], overwrite=True)
    if result.layers is not None:
        written["layers.json"] = atomic_write_json(
            out / "layers.json", result.layers, overwrite=True
        )
    written["metadata.json"] = atomic_write_json(
        out / "metadata.json", result.metadata, overwrite=True
    )
    return written


def file_digest(text: str) -> str:
    """SHA-256 of ``text`` as :func:`divscope.runmeta.atomic_write_text` writes it."""
    return hashlib.sha256(text.encode("utf-8", errors="backslashreplace")).hexdigest()
