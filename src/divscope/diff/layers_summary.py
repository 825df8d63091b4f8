"""``layers.json`` from the per-prompt layer units: fractions with CIs, drift with its floor,
named directions, the causal check and one sentence per leading block.

Every estimate is a ratio of sums over prompts (each prompt's sum over its scored positions,
so every position weighs the same); CIs resample prompts and recompute the ratio of sums in
each resample (percentile intervals).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from divscope.diff.layer_options import N_RANDOM
from divscope.diff.layers import LayerScores

N_LEADING = 3  # blocks that get a sentence and a causal check
N_TOKENS = 8  # tokens listed per direction
CI_LEVEL = 0.95
NOTES = [
    "walk B->A: hybrid networks switch one part at a time from B's weights to A's "
    "(embeddings, block 0, ..., the last block, final norm + head); a part's contribution is "
    "the drop in KL(P_A || P_hybrid) on A's samples; the contributions sum exactly to KL(A||B)",
    "fraction_reverse: the walk A->B (each part switched to B's in the same order, the rise "
    "in KL(P_A || P_hybrid)); the two orders bracket interactions between blocks",
    "a negative fraction: the block compensates (switching it raises the divergence)",
    "drift_*: residual stream after each block on the same positions; *_floor: A against "
    "itself (each sample run alone instead of in a batch: numerical noise)",
    "promotes / suppresses: the block's mean change mean(h_B - h_A) read out through each "
    "model's final norm (statistics of the vector itself) and output head, centred, averaged "
    "over A and B",
    "direction_fraction: KL(P_A || P_M) / KL(A||B), M = A with B's component along that "
    "mean change put in at the block's output; direction_p: empirical p-value against "
    "random directions; null for blocks not in causal_blocks: the causal_blocks_requested "
    "(--causal-blocks N) blocks with the largest positive share walking B->A, or with 'all' "
    "every block whose mean change is not 0",
    "CIs: prompts resampled, ratio of sums in each resample, percentile intervals",
]


def contributions(units: list[LayerScores]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per prompt ``(n, L + 2)`` contributions [embeddings, blocks, head] of both walks, and
    ``(n,)`` KL(A||B) sums."""
    total = np.array([u.kl_total for u in units])
    fwd = np.stack([u.forward for u in units])
    rev = np.stack([u.reverse for u in units])
    z = np.zeros((len(units), 1))
    cf = np.concatenate([total[:, None], fwd], 1) - np.concatenate([fwd, z], 1)
    cr = np.concatenate([rev, total[:, None]], 1) - np.concatenate([z, rev], 1)
    return cf, cr, total


def _weights(n: int, n_bootstrap: int, seed: int) -> np.ndarray:
    """``(n_bootstrap, n)`` multiplicities of prompts in each resample."""
    rng = np.random.default_rng(seed)
    return rng.multinomial(n, np.full(n, 1.0 / n), size=n_bootstrap).astype(np.float64)


def _ratio_ci(w: np.ndarray, num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """``(2, K)`` percentile CI of ``sum(num) / sum(den)`` over resamples ``w``."""
    top = w @ num
    bottom = (w @ den).reshape(len(w), -1)
    with np.errstate(divide="ignore", invalid="ignore"):
        r = top / bottom
    q = 100 * np.array([(1 - CI_LEVEL) / 2, (1 + CI_LEVEL) / 2])
    return np.nanpercentile(r, q, axis=0)


def _shift_share(delta_sum: np.ndarray, d2: np.ndarray, n: float) -> np.ndarray:
    """``|mean dh|^2 / mean |dh|^2`` per block from sums (``(..., L, H)``, ``(..., L)``)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(d2 > 0, (delta_sum**2).sum(-1) / (n * d2), 0.0)


def drift(units: list[LayerScores], w: np.ndarray) -> dict[str, np.ndarray]:
    """Per-block drift values, CIs and floors (see :data:`NOTES`)."""
    dr = np.stack([u.drift for u in units])  # (n, 5, L)
    dl = np.stack([u.delta for u in units])  # (n, 2, L, H)
    npos = np.array([u.n_positions for u in units], np.float64)
    n = npos.sum()
    s = dr.sum(0)
    out = {
        "drift_rel_norm": np.sqrt(s[0] / s[1]),
        "drift_rel_norm_ci": np.sqrt(_ratio_ci(w, dr[:, 0], dr[:, 1])),
        "drift_rel_norm_floor": np.sqrt(s[3] / s[1]),
        "drift_cosine": s[2] / n,
        "drift_cosine_ci": _ratio_ci(w, dr[:, 2], npos),
        "drift_cosine_floor": s[4] / n,
        "shift_share": _shift_share(dl[:, 0].sum(0), s[0], n),
        "shift_share_floor": _shift_share(dl[:, 1].sum(0), s[3], n),
    }
    boot = []
    for c0 in range(0, len(w), 100):  # bounded memory: (100, L, H) at a time
        wc = w[c0 : c0 + 100]
        ds = np.einsum("bn,nlh->blh", wc, dl[:, 0])
        boot.append(_shift_share(ds, wc @ dr[:, 0], (wc @ npos)[:, None]))
    q = 100 * np.array([(1 - CI_LEVEL) / 2, (1 + CI_LEVEL) / 2])
    out["shift_share_ci"] = np.percentile(np.concatenate(boot), q, axis=0)
    return out


def token_lists(readout: np.ndarray, decode: Callable[[int], str]) -> list[dict[str, list]]:
    """Per block the tokens its mean change promotes and suppresses: both models' read-outs
    ``(2, L, V)`` centred over the vocabulary and averaged."""
    x = (readout - readout.mean(-1, keepdims=True)).mean(0)  # (L, V)
    out = []
    for row in x:
        order = np.argsort(row)
        out.append({
            "promotes": [_tok(i, row, decode) for i in order[::-1][:N_TOKENS]],
            "suppresses": [_tok(i, row, decode) for i in order[:N_TOKENS]],
        })  # fmt: skip
    return out


def _tok(i: int, row: np.ndarray, decode: Callable[[int], str]) -> dict[str, Any]:
    return {"token": decode(int(i)), "id": int(i), "value": float(row[i])}


def leading_blocks(units: dict[int, LayerScores], deltas: np.ndarray, n: int | None) -> list[int]:
    """The ``n`` blocks with the largest positive B->A fraction that have a non-zero mean
    change; ``n`` None: every block with a non-zero mean change."""
    ok = np.linalg.norm(deltas, axis=-1) > 0
    if n is None:
        return [int(k) for k in np.flatnonzero(ok)]
    cf, _, _ = contributions(list(units.values()))
    per_block = cf[:, 1:-1].sum(0)
    order = [int(k) for k in np.argsort(-per_block) if ok[k] and per_block[k] > 0]
    return sorted(order[:n])


def _causal(dirs: tuple[list[int], np.ndarray] | None, total: float) -> dict[int, dict]:
    """Per checked block: direction_fraction, the random directions' fractions, p-value."""
    if dirs is None or total <= 0:
        return {}
    out = {}
    for b, sums in zip(dirs[0], dirs[1], strict=True):
        frac = sums / total
        rand = frac[1:]
        out[b] = {
            "direction_fraction": float(frac[0]),
            "random_fraction_mean": float(rand.mean()),
            "random_fraction_max": float(rand.max()),
            "direction_p": float((1 + (rand >= frac[0]).sum()) / (1 + len(rand))),
        }
    return out


def _fractions(cf: np.ndarray, cr: np.ndarray, total: np.ndarray, w: np.ndarray) -> dict:
    """Point fractions and CIs of both walks: ``(L + 2,)`` and ``(2, L + 2)`` arrays."""
    t = total.sum()
    return {
        "fraction": cf.sum(0) / t,
        "fraction_ci": _ratio_ci(w, cf, total),
        "fraction_reverse": cr.sum(0) / t,
        "fraction_reverse_ci": _ratio_ci(w, cr, total),
    }


def _by_category(cf: np.ndarray, cr: np.ndarray, total: np.ndarray, npos: np.ndarray,
                 categories: list[str | None]) -> dict[str, Any]:  # fmt: skip
    """Per prompt category: KL(A||B) per token and both walks' fractions (point values)."""
    out = {}
    for cat in sorted({c for c in categories if c}):
        sel = np.array([c == cat for c in categories])
        t = total[sel].sum()
        if t <= 0:
            continue
        out[cat] = {
            "n_prompts": int(sel.sum()),
            "kl_total": float(t / npos[sel].sum()),
            "embedding_fraction": float(cf[sel, 0].sum() / t),
            "head_fraction": float(cf[sel, -1].sum() / t),
            "fraction": (cf[sel, 1:-1].sum(0) / t).tolist(),
            "fraction_reverse": (cr[sel, 1:-1].sum(0) / t).tolist(),
        }
    return out


def _names(items: list[dict[str, Any]], n: int = 3) -> str:
    return ", ".join(repr(t["token"]) for t in items[:n])


def sentence(rec: dict[str, Any]) -> str:
    """One sentence for a block record: its share of KL(A||B) in both orders, the tokens its
    change promotes and suppresses, the causal check when there is one."""
    lo, hi = rec["fraction_ci"]
    f = rec["fraction"]
    verb = "carries" if f >= 0 else "compensates: it carries"
    s = (f"block {rec['layer']} {verb} {f:.2f} [{lo:.2f}, {hi:.2f}] of KL(A||B) "
         f"(reverse order {rec['fraction_reverse']:.2f})")  # fmt: skip
    if rec.get("promotes"):
        s += (f"; its change promotes {_names(rec['promotes'])} and suppresses "
              f"{_names(rec['suppresses'])}")  # fmt: skip
    if rec.get("direction_fraction") is not None:
        s += (f"; B's component along it alone gives {rec['direction_fraction']:.2f} of "
              f"KL(A||B) (random directions {rec['random_fraction_mean']:.2f}, "
              f"p = {rec['direction_p']:.2g})")  # fmt: skip
    return s


def _records(fr: dict, dr: dict, tokens: list[dict], causal: dict[int, dict]) -> list[dict]:
    """One record per block (see the ``layers.json`` contract in the README)."""
    out = []
    for k in range(len(tokens)):
        rec: dict[str, Any] = {"layer": k}
        for name, v in fr.items():
            rec[name] = (v[:, k + 1] if v.ndim == 2 else v[k + 1]).tolist()
        for name, v in dr.items():
            rec[name] = (v[:, k] if v.ndim == 2 else v[k]).tolist()
        rec["compensates"] = bool(fr["fraction_ci"][1, k + 1] < 0)
        rec |= tokens[k]
        rec |= causal.get(k, {"direction_fraction": None})
        out.append(rec)
    return out


def summarize(
    units: dict[int, LayerScores],
    readout: np.ndarray,
    dirs: tuple[list[int], np.ndarray] | None,
    *,
    labels: list[str],
    categories: list[str | None],
    decode: Callable[[int], str],
    n_bootstrap: int,
    seed: int,
    causal_request: int | str = 0,
) -> dict[str, Any]:
    """The ``layers.json`` document (see the module doc and :data:`NOTES`); ``dirs`` holds
    the causal check's blocks and sums, run for ``causal_request`` (``--causal-blocks``)."""
    us = list(units.values())
    cf, cr, total = contributions(us)
    npos = np.array([u.n_positions for u in us], np.float64)
    w = _weights(len(us), n_bootstrap, seed)
    fr = _fractions(cf, cr, total, w)
    causal = _causal(dirs, total.sum())
    records = _records(fr, drift(us, w), token_lists(readout, decode), causal)
    leading = sorted(records, key=lambda r: -r["fraction"])[:N_LEADING]
    return {
        "model_a": labels[0],
        "model_b": labels[1],
        "direction": "KL(A||B) on A's samples",
        "n_layers": len(records),
        "n_prompts": len(us),
        "n_positions": int(npos.sum()),
        "kl_total": float(total.sum() / npos.sum()),
        "kl_total_ci": (_ratio_ci(w, total[:, None], npos)[:, 0]).tolist(),
        "embedding_fraction": float(fr["fraction"][0]),
        "embedding_fraction_ci": fr["fraction_ci"][:, 0].tolist(),
        "embedding_fraction_reverse": float(fr["fraction_reverse"][0]),
        "head_fraction": float(fr["fraction"][-1]),
        "head_fraction_ci": fr["fraction_ci"][:, -1].tolist(),
        "head_fraction_reverse": float(fr["fraction_reverse"][-1]),
        "sum_of_fractions": float(fr["fraction"].sum()),
        "sentences": [sentence(r) for r in leading],
        "layers": records,
        "causal_blocks_requested": causal_request,
        "causal_blocks": sorted(causal),
        "n_random_directions": N_RANDOM if causal_request != 0 else 0,
        "by_category": _by_category(cf, cr, total, npos, categories),
        "ci_level": CI_LEVEL,
        "n_bootstrap": n_bootstrap,
        "notes": NOTES,
    }


def add_output_overlap(doc: dict[str, Any], changed: dict[str, Any]) -> None:
    """Mark, per block, which promoted / suppressed tokens are also among the output-level
    "what changed" tokens (boosted / suppressed in B)."""
    overall = changed.get("overall", {})
    up = {t["id"] for t in overall.get("boosted_in_b", [])}
    down = {t["id"] for t in overall.get("suppressed_in_b", [])}
    for rec in doc["layers"]:
        rec["promotes_in_what_changed"] = [t["token"] for t in rec["promotes"] if t["id"] in up]
        rec["suppresses_in_what_changed"] = [
            t["token"] for t in rec["suppresses"] if t["id"] in down
        ]
