"""The report sections of a model-diff folder (``divscope diff``, kl_demo with
``SOURCE = "models"``): the dataset summary (``summary.json``), the "what changed" tokens
(``what_changed.json``) and, with ``--layers``, where inside the model the divergence arises
(``layers.json``). Each section appears when its file is there; an unreadable file gets a
note naming it instead of a section."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

MAX_BYTES = 64 * 2**20  # a diff's JSON files are a few MB at most


def _load(path: Path, page: Any) -> dict[str, Any] | None:
    """The JSON object in ``path``, None when absent; a note on the page when unreadable."""
    if not path.exists():
        return None
    try:
        if path.stat().st_size > MAX_BYTES:
            raise ValueError(f"larger than {MAX_BYTES} bytes")
        doc = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(doc, dict):
            raise ValueError("not a JSON object")
        return doc
    except (OSError, ValueError) as e:
        page.para(f"{path}: not shown ({e}). Fix: rerun the diff to rewrite it", "note")
        return None


def summary_section(doc: dict[str, Any], page: Any) -> None:
    """Both sides' dataset summaries side by side (scalars; percentiles flattened)."""
    sides = [k for k in ("on_a_samples", "on_b_samples") if isinstance(doc.get(k), dict)]
    if not sides:
        return
    page.heading("Dataset summary")
    for note in doc.get("notes", []):
        page.para(str(note), "muted")
    flat = [_flat(doc[s]) for s in sides]
    keys = list(dict.fromkeys(k for f in flat for k in f))
    page.table(["quantity", *[s.replace("_", " ") for s in sides]],
               [[k, *[f.get(k) for f in flat]] for k in keys], table_id="summary")  # fmt: skip


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out |= _flat(v, f"{prefix}{k} ")
        elif not isinstance(v, list):
            out[f"{prefix}{k}"] = v
    return out


def _token_rows(items: list[dict[str, Any]], n: int = 20) -> list[list[Any]]:
    return [[repr(t.get("token")), t.get("delta_prob"), t.get("weighted_log_ratio")]
            for t in items[:n]]  # fmt: skip


def what_changed_section(doc: dict[str, Any], page: Any) -> None:
    """The tokens B raises and lowers most, overall and per prompt category."""
    overall = doc.get("overall") or {}
    if not overall:
        return
    page.heading("What changed (output tokens)")
    if overall.get("definition"):
        page.para(str(overall["definition"]), "muted")
    head = ["token", "mean delta p", "weighted log ratio"]
    for key, title in (("boosted_in_b", "raised in B"), ("suppressed_in_b", "lowered in B")):
        page.para(f"{title} ({overall.get('positions')} positions)")
        page.table(head, _token_rows(overall.get(key, [])), table_id=f"changed_{key}")
    cats = doc.get("by_category") or {}
    if cats:
        rows = [[c, v.get("positions"), ", ".join(repr(t["token"]) for t in v.get("boosted_in_b", [])[:5]),
                 ", ".join(repr(t["token"]) for t in v.get("suppressed_in_b", [])[:5])]
                for c, v in cats.items()]  # fmt: skip
        page.table(["category", "positions", "raised in B", "lowered in B"], rows,
                   table_id="changed_categories")  # fmt: skip


def _names(items: list[dict[str, Any]], n: int = 3) -> str:
    return ", ".join(repr(t["token"]) for t in items[:n])


def layers_section(doc: dict[str, Any], page: Any) -> None:
    """Where inside the model: the sentences, the figure and one row per block."""
    from divscope.report.layer_plots import layer_fractions

    page.heading("Where inside the model (--layers)")
    page.para(f"KL(A||B) {doc['kl_total']:.4g} nats/token on {doc['n_positions']} positions of "
              f"A's samples ({doc['n_prompts']} prompts); embeddings "
              f"{doc['embedding_fraction']:.3f}, head {doc['head_fraction']:.3f}.")  # fmt: skip
    for s in doc.get("sentences", []):
        page.para(s)
    for note in doc.get("notes", []):
        page.para(note, "muted")
    page.figure("layers", layer_fractions(doc), "fraction of KL(A||B) per block, drift")
    head = ["block", "fraction", "ci low", "ci high", "reverse", "drift", "drift floor",
            "cosine", "shift share", "promotes", "suppresses", "direction fraction", "p"]  # fmt: skip
    rows = [[r["layer"], r["fraction"], *r["fraction_ci"], r["fraction_reverse"],
             r["drift_rel_norm"], r["drift_rel_norm_floor"], r["drift_cosine"],
             r["shift_share"], _names(r["promotes"]), _names(r["suppresses"]),
             r.get("direction_fraction"), r.get("direction_p")] for r in doc["layers"]]  # fmt: skip
    page.table(head, rows, table_id="layers")


def diff_sections(run: Path, page: Any) -> None:
    """Every section whose file the run directory holds (see the module doc)."""
    for name, section in (("summary.json", summary_section),
                          ("what_changed.json", what_changed_section),
                          ("layers.json", layers_section)):  # fmt: skip
        doc = _load(run / name, page)
        if doc is not None:
            try:
                section(doc, page)
            except (KeyError, TypeError, ValueError) as e:
                page.para(f"{run / name}: not shown (unexpected content: {e!r}). Fix: rerun "
                          "the diff to rewrite it", "note")  # fmt: skip
