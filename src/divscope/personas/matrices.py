"""From scored units to persona matrices: aggregation, consistency checks, cosine.

Everything here is plain numpy on the units' results; nothing touches a model.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from divscope.models.teacher_force import UnitScores

LN2 = math.log(2.0)
NOISE_FLOOR_JS = 1e-6  # nats: a persona vs its duplicate (another batch row): JS and both KLs
CHECK_DESCRIPTIONS = {  # what each consistency check tests, in one line
    "no_nan": "every matrix finite: no NaN, no inf",
    "js_symmetric": "JS(a, b) = JS(b, a)",
    "js_in_0_ln2": "0 <= JS <= ln 2 nats",
    "diagonals_zero": "a persona against itself scores 0",
    "kl_nonnegative": "KL >= 0 in both directions",
    "noise_floor_twin": "persona 0 vs its twin in another batch row: JS, KL below threshold",
    "seam": "prompt + answer ids re-render as the whole chat",
}


def aggregate(units: dict[tuple[int, int], UnitScores], n: int, n_q: int) -> dict[str, np.ndarray]:
    """Means over questions -> the N x N matrices.

    Args:
        units: (generator g, question q) -> the response's scores against every persona o.
        n: Personas (a twin's column, if any, sits at index ``n`` and is left out).
        n_q: Questions.

    Returns:
        ``kl_fwd[g][o] = KL(P_g||P_o)`` and ``kl_rev[g][o] = KL(P_o||P_g)`` on g's responses;
        ``js_by_generator[g][o]`` = JS on g's responses; ``js`` = its symmetrisation;
        ``kl_sym`` = mean of ``kl_fwd`` and its transpose; ``kl_asym = kl_fwd - kl_fwd.T``.
        All in nats, ``(n, n)``.
    """
    js_g = np.zeros((n, n))
    kl_fwd = np.zeros((n, n))
    kl_rev = np.zeros((n, n))
    for (g, _q), u in units.items():
        js_g[g] += u.js[:n] / n_q
        kl_fwd[g] += u.kl_fwd[:n] / n_q
        kl_rev[g] += u.kl_rev[:n] / n_q
    matrices = {
        "js": 0.5 * (js_g + js_g.T),
        "js_by_generator": js_g,
        "kl_fwd": kl_fwd,
        "kl_rev": kl_rev,
        "kl_sym": 0.5 * (kl_fwd + kl_fwd.T),
        "kl_asym": kl_fwd - kl_fwd.T,
    }
    return matrices


def check_matrices(m: dict[str, np.ndarray], noise_floor: float | None) -> dict[str, Any]:
    """The consistency checks; each entry has the measured value and ``ok``."""
    js = m["js"]
    non_finite = sum(int((~np.isfinite(v)).sum()) for v in m.values())
    checks = {
        "no_nan": {"non_finite": non_finite, "ok": non_finite == 0},
        "js_symmetric": {"max_abs_asymmetry": float(np.abs(js - js.T).max())},
        "js_in_0_ln2": {"min": float(js.min()), "max": float(js.max()), "ln2": LN2},
        "diagonals_zero": {
            "max_abs": float(
                max(
                    np.abs(np.diag(m[k])).max()
                    for k in ("js", "js_by_generator", "kl_fwd", "kl_rev")
                )
            )
        },
        "kl_nonnegative": {"min": float(min(m["kl_fwd"].min(), m["kl_rev"].min()))},
    }
    checks["js_symmetric"]["ok"] = checks["js_symmetric"]["max_abs_asymmetry"] <= 1e-12
    checks["js_in_0_ln2"]["ok"] = bool(js.min() >= -1e-9 and js.max() <= LN2 + 1e-9)
    checks["diagonals_zero"]["ok"] = checks["diagonals_zero"]["max_abs"] <= 1e-12
    checks["kl_nonnegative"]["ok"] = checks["kl_nonnegative"]["min"] >= -1e-6
    if noise_floor is not None:
        checks["noise_floor_twin"] = {
            "max_js": noise_floor,
            "threshold": NOISE_FLOOR_JS,
            "ok": noise_floor <= NOISE_FLOOR_JS,
        }
    checks["all_ok"] = all(v["ok"] for v in checks.values() if isinstance(v, dict))
    return checks


def cosine_matrices(hidden: np.ndarray, layers: list[int]) -> dict[str, Any]:
    """Raw and centred cosine between personas per layer.

    Args:
        hidden: ``(N, Q, n_layers, H)`` last-prompt-position hidden states.

    Returns:
        ``{"layers": [...], "raw": {layer: N x N}, "centred": {layer: N x N}}``; centred
        subtracts the mean over personas (after averaging over questions) first.
    """
    mean = hidden.astype(np.float64).mean(1)  # (N, L, H)
    out: dict[str, Any] = {
        "layers": layers,
        "raw": {},
        "centred": {},
        "note": "hidden_states[0] is the embedding output; index i is the "
        "output of block i, the last one after the final norm",
    }
    for k, layer in enumerate(layers):
        for kind, x in (("raw", mean[:, k]), ("centred", mean[:, k] - mean[:, k].mean(0))):
            unit = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-30)
            out[kind][str(layer)] = (unit @ unit.T).tolist()
    return out


def twin_deviation(units: dict[tuple[int, int], UnitScores], n: int) -> float:
    """The noise floor: max |score(twin) - score(persona 0)| over every unit, JS and both KLs.

    The twin (index ``n``) has persona 0's prompt under another name, scored in another batch
    row: against every generator it must give what persona 0 gives, to fp32 precision.
    """
    return max(
        max(abs(float(a[n] - a[0])) for a in (u.js, u.kl_fwd, u.kl_rev)) for u in units.values()
    )
