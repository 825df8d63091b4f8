"""Confidence intervals over responses that stay honest with few of them.

A prompt's rate is a ratio estimator over its k responses, ``R = sum s_i / sum n_i`` (``s_i``
the response's summed per-token terms in nats, ``n_i`` its tokens or bytes). Its standard
error is the delta-method (cluster-robust) one,

    var(R) = k / (k - 1) * sum_i (s_i - R n_i)^2 / (sum_i n_i)^2,

and the interval is ``R -+ t_{df, 1 - alpha/2} * se`` with ``df = k - 1`` (Welch-Satterthwaite
for the mean of two sides' independent estimates). A percentile bootstrap over 4-16 responses
covers the exact rate 76-88% of the time; this interval about 93% (measured on two bigram
models with exact answers: ``tests/test_intervals.py``). A plain mean is the case ``n_i = 1``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import stats


@dataclass(frozen=True)
class Estimate:
    """A value with its variance and degrees of freedom (None: one response, no spread)."""

    value: float
    var: float | None
    df: float | None


def ratio_estimate(s: np.ndarray, n: np.ndarray) -> Estimate | None:
    """``sum s / sum n`` with its delta-method variance; None when ``sum n`` is 0.

    Args:
        s: ``(k,)`` per-response sums (nats).
        n: ``(k,)`` per-response counts (tokens or bytes).
    """
    s, n = np.asarray(s, dtype=np.float64), np.asarray(n, dtype=np.float64)
    total = n.sum()
    if total == 0:
        return None
    r = float(s.sum() / total)
    k = len(s)
    if k < 2:
        return Estimate(r, None, None)
    var = k / (k - 1) * float(((s - r * n) ** 2).sum()) / total**2
    return Estimate(r, var, k - 1.0)


def mean_estimate(x: np.ndarray) -> Estimate | None:
    """The mean of ``x`` (one value per response) with its variance ``sd^2 / k``."""
    return ratio_estimate(x, np.ones(len(x)))


def average(a: Estimate, b: Estimate) -> Estimate:
    """``(a + b) / 2`` of two independent estimates, Welch-Satterthwaite degrees of freedom."""
    value = 0.5 * (a.value + b.value)
    if a.var is None or b.var is None or a.df is None or b.df is None:
        return Estimate(value, None, None)
    var = 0.25 * (a.var + b.var)
    parts = (0.25 * a.var) ** 2 / a.df + (0.25 * b.var) ** 2 / b.df
    df = var**2 / parts if parts > 0 else a.df + b.df
    return Estimate(value, var, df)


def t_interval(e: Estimate, ci_level: float) -> list[float] | None:
    """``value -+ t * se`` at ``ci_level``; None without a variance (one response)."""
    if e.var is None or e.df is None or not math.isfinite(e.var):
        return None
    half = float(stats.t.ppf(0.5 + ci_level / 2, e.df)) * math.sqrt(e.var)
    return [e.value - half, e.value + half]
