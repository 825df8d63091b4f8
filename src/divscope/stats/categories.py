"""Small shared summaries: means with bootstrap CIs per category."""

from __future__ import annotations

from typing import Any

import numpy as np


def category_means(
    values: dict[str, list[float]], n_boot: int = 1000, seed: int = 0, level: float = 0.95
) -> list[dict[str, Any]]:
    """Mean and percentile-bootstrap CI (over the category's items) per category.

    Args:
        values: category -> values.

    Returns:
        Rows ``{category, n, mean, ci_low, ci_high}``, highest mean first; the CI is None for
        a category with a single value.
    """
    rng = np.random.default_rng(seed)
    a = (1 - level) / 2
    rows = []
    for cat, v in values.items():
        x = np.asarray(v, dtype=float)
        lo = hi = None
        if len(x) > 1:
            boots = x[rng.integers(0, len(x), (n_boot, len(x)))].mean(1)
            lo, hi = float(np.quantile(boots, a)), float(np.quantile(boots, 1 - a))
        rows.append(
            {"category": cat, "n": len(x), "mean": float(x.mean()), "ci_low": lo, "ci_high": hi}
        )
    return sorted(rows, key=lambda r: -r["mean"])
