"""Writing a diff's run directory: ``ranking.json`` (the ``divscope rank --json`` contract),
``summary.json``, ``what_changed.json``, both sides' samples as divscope JSONL (token ids,
top-k logprobs, aligned cross-scores, and the exact per-position values under ``exact``) and
``metadata.json``; with ``--layers`` also ``layers.json``. Every file is checked for a clash before anything is written."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from divscope.diff.pipeline import DiffResult
from divscope.diff.samplefiles import columns, prompt_record, token_strings
from divscope.diff.score import SIDES
from divscope.runmeta import atomic_write_json, atomic_write_text
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


def write_outputs(
    result: DiffResult, out_dir: str | Path, *, overwrite: bool = False
) -> dict[str, Path]:
    """Write the run directory (see the module doc); refuses, before writing anything, when a
    file exists and ``overwrite`` is False."""
    out = Path(out_dir)
    names = FILES + (("layers.json",) if result.layers is not None else ())
    if not overwrite:
        clash = [f for f in names if (out / f).exists()]
        if clash:
            raise FileExistsError(
                f"{out} already holds {clash}; choose a new --out or pass --overwrite"
            )
    out.mkdir(parents=True, exist_ok=True)
    strings = None if result.records else token_strings(result.setup.tokenizers["a"])
    written = {}
    doc = result.ranking.to_json()
    doc["files"] = [str(out / f"samples_{s}.jsonl") for s in SIDES]
    written["ranking.json"] = atomic_write_json(out / "ranking.json", doc, overwrite=True)
    written["summary.json"] = atomic_write_json(
        out / "summary.json", result.summary, overwrite=True
    )
    written["what_changed.json"] = atomic_write_json(
        out / "what_changed.json", result.changed, overwrite=True
    )
    for side in SIDES:
        recs = result.records[side] if result.records else sample_records(result, side, strings)
        lines = [json.dumps(r, ensure_ascii=False) for r in recs]
        name = f"samples_{side}.jsonl"
        written[name] = atomic_write_text(out / name, "\n".join(lines) + "\n", overwrite=True)
    if result.layers is not None:
        written["layers.json"] = atomic_write_json(
            out / "layers.json", result.layers, overwrite=True
        )
    written["metadata.json"] = atomic_write_json(
        out / "metadata.json", result.metadata, overwrite=True
    )
    return written
