"""Confidence intervals over responses that stay honest with few of them.

A prompt's rate is a ratio estimator over its k responses, ``R = sum s_i / sum n_i`` (``s_i``
the response's summed per-token terms in nats, ``n_i`` its tokens or bytes). The point
estimate is ``R`` itself (biased at small k, by a sign and size that depend on the models; a
jackknife bias correction over-corrects at k <= 4, so none is applied). Its standard error is
the jackknife (leave-one-response-out) one,

    R_(i) = (sum s - s_i) / (sum n - n_i),   var(R) = (k - 1) / k * sum_i (R_(i) - mean R_(.))^2,

and the interval is ``R -+ t_{df, 1 - alpha/2} * se`` with ``df = k - 1`` (Welch-Satterthwaite
for the mean of two sides' independent estimates). The delta-method (cluster-robust) variance
``k / (k - 1) * sum_i (s_i - R n_i)^2 / (sum_i n_i)^2`` is kept for comparison
(``method="delta"``): it covers less at small k (benchmarks/bench_intervals.py measures both on
three model pairs with exact answers; a percentile bootstrap covered only 76-88% at 4-16
responses). A plain mean is the case ``n_i = 1``, where both equal ``sd^2 / k``.

An interval for a non-negative quantity (KL, JS, their bounds) is CLIPPED to its range
(``[0, inf)``, ``[0, ln 2]`` for JS): intersecting with a set that holds the truth never
uncovers it, so the coverage is the unclipped interval's. A log transform would need a
positive point estimate, which ``mc_kl`` (a mean of log-ratios) need not have. The point
estimate is never clipped; an interval wholly outside the range collapses onto its edge.
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


def ratio_variance(s: np.ndarray, n: np.ndarray, method: str = "jackknife") -> np.ndarray:
    """The variance of ``sum s / sum n`` over the last axis (k >= 2 responses), for many
    prompts at once; NaN where a leave-one-out ratio has no tokens.

    Args:
        s: ``(..., k)`` per-response sums (nats).
        n: ``(..., k)`` per-response counts (tokens or bytes).
        method: ``"jackknife"`` (leave one response out) or ``"delta"`` (cluster-robust).
    """
    s, n = np.asarray(s, dtype=np.float64), np.asarray(n, dtype=np.float64)
    k = s.shape[-1]
    big_s, big_n = s.sum(-1, keepdims=True), n.sum(-1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        if method == "delta":
            r = big_s / big_n
            return k / (k - 1) * ((s - r * n) ** 2).sum(-1) / big_n[..., 0] ** 2
        if method != "jackknife":
            raise ValueError(f"method must be 'jackknife' or 'delta' (got {method!r})")
        loo = (big_s - s) / (big_n - n)
        dev = loo - loo.mean(-1, keepdims=True)
        return (k - 1) / k * (dev**2).sum(-1)


def ratio_estimate(s: np.ndarray, n: np.ndarray, method: str = "jackknife") -> Estimate | None:
    """``sum s / sum n`` with its variance (:func:`ratio_variance`); None when ``sum n`` is 0.

    Args:
        s: ``(k,)`` per-response sums (nats).
        n: ``(k,)`` per-response counts (tokens or bytes).
        method: The variance, ``"jackknife"`` (the default) or ``"delta"``.
    """
    s, n = np.asarray(s, dtype=np.float64), np.asarray(n, dtype=np.float64)
    total = n.sum()
    if total == 0:
        return None
    r = float(s.sum() / total)
    k = len(s)
    if k < 2:
        return Estimate(r, None, None)
    return Estimate(r, float(ratio_variance(s, n, method)), k - 1.0)


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


def clip_interval(
    lo: np.ndarray | float, hi: np.ndarray | float, low: float | None, high: float | None
) -> tuple[np.ndarray, np.ndarray]:
    """``[lo, hi]`` intersected with ``[low, high]`` (None: unbounded); an interval wholly
    outside collapses onto the nearer edge."""
    lo, hi = np.asarray(lo, dtype=np.float64), np.asarray(hi, dtype=np.float64)
    bottom = -np.inf if low is None else low
    top = np.inf if high is None else high
    return np.clip(lo, bottom, top), np.clip(hi, bottom, top)


def t_interval(
    e: Estimate, ci_level: float, limits: tuple[float | None, float | None] = (None, None)
) -> list[float] | None:
    """``value -+ t * se`` at ``ci_level``, clipped to ``limits`` (the quantity's range, e.g.
    ``(0, None)`` for a KL); None without a variance (one response)."""
    if e.var is None or e.df is None or not math.isfinite(e.var):
        return None
    half = float(stats.t.ppf(0.5 + ci_level / 2, e.df)) * math.sqrt(e.var)
    lo, hi = clip_interval(e.value - half, e.value + half, *limits)
    return [float(lo), float(hi)]
