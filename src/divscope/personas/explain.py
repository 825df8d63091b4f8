"""Say what differs, not just how much: per-token attribution and "what changed" tokens.

* :func:`persona_pair_explanation` teacher-forces the answers of two personas A and B under
  both prompts and returns, per answer and position, the divergence with the token and both
  sides' top-k, plus the tokens whose probability moves most from A to B, aggregated over all
  scored positions (:class:`divscope.divergence.attribution.WhatChanged`: the expected
  probability difference and the probability-weighted log-ratio, streamed over positions).
* :func:`pair_cosine_by_layer` reads the cosine-by-layer curve of every persona pair.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from divscope.bounded import ArrayFileError, read_unit_json, write_unit_json
from divscope.divergence.attribution import WhatChanged
from divscope.divergence.fused import js_and_kls
from divscope.models.teacher_force import output_head, response_logprobs
from divscope.runmeta import content_hash

EXPLAIN_FORMAT = 2  # in every cache key: bump when an explanation's file changes (2: checksum)


def _tok(tokenizer: Any, i: int) -> str:
    return tokenizer.decode([int(i)])


def _topk_rows(tokenizer: Any, lp: torch.Tensor, k: int) -> list[list[list[Any]]]:
    """Per position, the ``k`` most likely tokens and their probabilities."""
    top, ids = lp.topk(k, -1)
    return [
        [[_tok(tokenizer, i), float(v)] for i, v in zip(ii, vv, strict=True)]
        for ii, vv in zip(ids.tolist(), top.exp().tolist(), strict=True)
    ]


def _response_view(
    tokenizer: Any,
    rec: dict[str, Any],
    la: torch.Tensor,
    lb: torch.Tensor,
    top_k: int,
    top_positions: int,
) -> dict[str, Any]:
    """One answer position by position: JS, both KLs, both sides' top-k, the top positions."""
    js, kl_ab, kl_ba = js_and_kls(la, lb)
    tokens = [_tok(tokenizer, t) for t in rec["response_token_ids"]]
    share = js / js.sum().clamp(min=1e-30)
    order = torch.argsort(js, descending=True)[:top_positions].tolist()
    return {
        "generator": rec["persona"],
        "question_id": rec["question_id"],
        "question": rec.get("question"),
        "tokens": tokens,
        "js": js.tolist(),
        "kl_ab": kl_ab.tolist(),
        "kl_ba": kl_ba.tolist(),
        "top_a": _topk_rows(tokenizer, la, top_k),
        "top_b": _topk_rows(tokenizer, lb, top_k),
        "mean_js": float(js.mean()),
        "top_positions": [
            {"position": i, "token": tokens[i], "js": float(js[i]), "share": float(share[i])}
            for i in order
        ],
    }


@torch.no_grad()
def persona_pair_explanation(
    model: Any,
    tokenizer: Any,
    records: list[dict[str, Any]],
    prompts: dict[tuple[str, str], list[int]],
    a: str,
    b: str,
    *,
    top_k: int = 5,
    n_tokens: int = 15,
    top_positions: int = 5,
) -> dict[str, Any]:
    """Token-level view and "what changed" for personas ``a`` -> ``b``.

    Args:
        model, tokenizer: The model of the persona run.
        records: ``generations.json`` records (persona, question_id, response_token_ids, ...).
        prompts: ``(persona, question_id) -> prompt ids`` for both personas.
        a, b: The persona pair; A's and B's own answers are both used.
        top_k: Top tokens shown per side at each position.
        n_tokens: Boosted / suppressed tokens reported per direction.
        top_positions: Positions listed as carrying most of each answer's divergence.

    Returns:
        ``{"a", "b", "responses": [...], "what_changed": {...}}``; each response has per-token
        ``js``, ``kl_ab`` = KL(P_A||P_B), ``kl_ba`` and both sides' top-k.
    """
    head = output_head(model)
    changed = WhatChanged(head[0].shape[0])
    responses = []
    for rec in records:
        if rec["persona"] not in (a, b) or not rec["response_token_ids"]:
            continue
        q, resp = rec["question_id"], rec["response_token_ids"]
        la = response_logprobs(model, prompts[(a, q)], resp, head)  # (T, V)
        lb = response_logprobs(model, prompts[(b, q)], resp, head)
        changed.add(la, lb)
        responses.append(_response_view(tokenizer, rec, la, lb, top_k, top_positions))
    return {
        "a": a,
        "b": b,
        "positions": changed.n_pos,
        "responses": responses,
        "what_changed": changed.tokens(lambda i: _tok(tokenizer, i), n_tokens),
    }


def pair_cosine_by_layer(
    cosine: dict[str, Any], names: list[str], kind: str = "centred"
) -> dict[str, list[float]]:
    """``"a|b" -> [cosine at each layer]`` for every persona pair (from ``cosine.json``)."""
    layers = [str(x) for x in cosine["layers"]]
    out = {}
    for i, a in enumerate(names):
        for j in range(i + 1, len(names)):
            out[f"{a}|{names[j]}"] = [float(cosine[kind][layer][i][j]) for layer in layers]
    return out


def explain_run(
    model: Any,
    tokenizer: Any,
    records: list[dict[str, Any]],
    names: list[str],
    js: np.ndarray,
    *,
    n_pairs: int = 2,
    cache: str | Path | None = None,
    **kwargs: Any,
) -> list[dict[str, Any]]:
    """:func:`persona_pair_explanation` for the ``n_pairs`` farthest persona pairs by JS.

    With ``cache`` (a directory for this model, e.g. the persona run's unit cache,
    ``PersonaResult.cache``) each pair's explanation is kept there by content (both personas'
    prompt and response ids, the tokenizer, the options): a rerun reads it back.
    """
    prompts = {(r["persona"], r["question_id"]): r["prompt_token_ids"] for r in records}
    iu = np.triu_indices(len(names), 1)
    order = np.argsort(-np.asarray(js)[iu])[:n_pairs]
    out = []
    for k in order:
        a, b = names[iu[0][k]], names[iu[1][k]]
        path = _explain_path(cache, tokenizer, records, prompts, a, b, kwargs) if cache else None
        cached = _read_explanation(path) if path is not None else None
        if cached is not None:
            out.append(cached)
            continue
        ex = persona_pair_explanation(model, tokenizer, records, prompts, a, b, **kwargs)
        if path is not None:
            write_unit_json(path, path.stem, ex)
        out.append(ex)
    return out


def _read_explanation(path: Path) -> dict[str, Any] | None:
    """A cached explanation, or None when there is none or it fails its checks (then it is
    named in a warning and recomputed, as every cache unit)."""
    if not path.exists():
        return None
    try:
        return read_unit_json(
            path, path.stem, lambda v: None if isinstance(v, dict) else "is not an explanation"
        )
    except ArrayFileError as e:
        warnings.warn(f"{e}; recomputing this unit", stacklevel=3)
        return None


def _explain_path(
    cache: str | Path,
    tokenizer: Any,
    records: list[dict[str, Any]],
    prompts: dict[tuple[str, str], list[int]],
    a: str,
    b: str,
    options: dict[str, Any],
) -> Path:
    """Where the explanation of ``a -> b`` lives in ``cache``: addressed by what it reads."""
    answers = [
        [r["persona"], r["question_id"], r["response_token_ids"]]
        for r in records
        if r["persona"] in (a, b)
    ]
    key = content_hash(
        {
            "format": EXPLAIN_FORMAT,
            "a": a,
            "b": b,
            "prompts": sorted([[p, q, ids] for (p, q), ids in prompts.items() if p in (a, b)]),
            "answers": answers,
            "tokenizer": [getattr(tokenizer, "name_or_path", ""), len(tokenizer)],
            "options": options,
        }
    )
    return Path(cache) / f"explain_{key}.json"
