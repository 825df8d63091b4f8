"""From scored prompts to what a researcher reads: per-prompt scores with CIs (the
``divscope rank --json`` contract), the dataset summary and "what changed".

Per response: means over its positions (normalised once). Per prompt (A's samples scored
with KL(A||B), B's with KL(B||A)):

* ``kl_ab`` = mean over A's responses of the per-token KL(P_A||P_B) rate; ``kl_ba`` the same
  on B's responses with KL(P_B||P_A); ``kl`` = their mean. Likewise ``js_ab``, ``js_ba``,
  ``js`` (JS in [0, ln 2]).
* ``mc_kl_ab`` = mean over A's responses of the mean of ``log P_A(x_t) - log P_B(x_t)`` over
  the sampled tokens (the Monte Carlo view of the same samples; same weighting as ``kl_ab``);
  ``mc_kl_ba``, ``mc_kl`` likewise.

CIs are t-intervals over responses (:mod:`divscope.estimators.intervals`; the two sides'
estimates are independent, Welch-Satterthwaite degrees of freedom for their mean), clipped to
each quantity's range: ``[0, inf)`` for KL and ``mc_kl``, ``[0, ln 2]`` for JS.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from divscope.diff.score import PairScores, SideScores
from divscope.divergence.attribution import WhatChanged
from divscope.estimators.intervals import (
    Estimate,
    average,
    mean_estimate,
    ratio_estimate,
    t_interval,
)
from divscope.estimators.ranking import PromptScore, assign_ranks, metric_range

METRICS = ("kl", "kl_ab", "kl_ba", "js", "js_ab", "js_ba", "mc_kl", "mc_kl_ab", "mc_kl_ba")
UNITS = {m: "nats/token" for m in METRICS}
PERCENTILES = (99.9, 99.0, 95.0, 90.0, 50.0, 10.0, 5.0, 1.0, 0.1)


def response_rates(side: SideScores, name: str) -> np.ndarray:
    """Per response: the mean over its positions of ``name`` (``mc`` = lp_a - lp_b)."""
    values = side.lp_a - side.lp_b if name == "mc" else getattr(side, name)
    sums = np.add.reduceat(values.astype(np.float64), np.r_[0, np.cumsum(side.lengths)[:-1]])
    return sums / side.lengths


CI_METHOD = (
    "t-interval over responses (Welch-Satterthwaite for the mean of both sides), clipped to "
    "[0, inf) (JS: [0, ln 2])"
)


def prompt_score(
    index: int, prompt: str, category: str | None, unit: PairScores, *, ci_level: float
) -> PromptScore:
    """Every metric of one prompt (see the module doc) with t-intervals over responses."""
    a, b = unit.sides["a"], unit.sides["b"]
    per_side = {
        "_ab": {"kl": response_rates(a, "kl_ab"), "js": response_rates(a, "js")},
        "_ba": {"kl": response_rates(b, "kl_ba"), "js": response_rates(b, "js")},
    }
    per_side["_ab"]["mc_kl"] = response_rates(a, "mc")
    per_side["_ba"]["mc_kl"] = -response_rates(b, "mc")
    estimates: dict[str, Estimate] = {}
    for base in ("kl", "js", "mc_kl"):
        for suffix, rates in per_side.items():
            estimates[base + suffix] = mean_estimate(rates[base])
        estimates[base] = average(estimates[base + "_ab"], estimates[base + "_ba"])
    return PromptScore(
        index=index,
        prompt=prompt,
        category=category,
        rank=None,
        reason=None,
        scores={m: estimates[m].value for m in METRICS},
        ci={m: t_interval(estimates[m], ci_level, metric_range(m)) for m in METRICS},
        coverage={
            "n_tokens": [int(a.lengths.sum()), int(b.lengths.sum())],
            "same_top_rate": [float(a.agree.mean()), float(b.agree.mean())],
        },
        n_responses=[len(a.lengths), len(b.lengths)],
        excluded_responses=[0, 0],
        excluded_reasons=[[], []],
    )


def rank(prompts: list[PromptScore], metric: str) -> None:
    """Rank 1 = most different by ``metric`` (in place)."""
    assign_ranks(prompts, metric, list(METRICS))


def clustered_mean(values: list[np.ndarray]) -> tuple[float, float | None]:
    """Mean over all tokens and its standard error clustered by prompt (one array of token
    values per prompt): the ratio estimator ``sum S_i / sum N_i`` with the cluster-robust
    (delta-method) variance ``n/(n-1) sum (S_i - m N_i)^2 / (sum N_i)^2``; None with one prompt.
    """
    s = np.array([v.astype(np.float64).sum() for v in values])
    n = np.array([len(v) for v in values], dtype=np.float64)
    e = ratio_estimate(s, n, method="delta")
    return e.value, None if e.var is None else float(np.sqrt(e.var))


def side_summary(units: list[PairScores], side: str) -> dict[str, Any]:
    """The llama.cpp-style table on one side's samples (KL in that side's direction)."""
    sides = [u.sides[side] for u in units]
    kl_name = "kl_ab" if side == "a" else "kl_ba"
    kl = [getattr(s, kl_name) for s in sides]
    flat = np.concatenate(kl).astype(np.float64)
    js = [s.js for s in sides]
    js_flat = np.concatenate(js).astype(np.float64)
    mean, se = clustered_mean(kl)
    top, top_se = clustered_mean([s.agree.astype(np.float64) for s in sides])
    dp2 = [
        (np.exp(s.lp_b.astype(np.float64)) - np.exp(s.lp_a.astype(np.float64))) ** 2 for s in sides
    ]
    ms, ms_se = clustered_mean(dp2)
    lppl, lppl_se = clustered_mean([s.lp_a.astype(np.float64) - s.lp_b for s in sides])
    js_mean, js_se = clustered_mean(js)
    return {
        "tokens": int(len(flat)),
        "kl_direction": "KL(A||B)" if side == "a" else "KL(B||A)",
        "kl_mean": mean,
        "kl_se": se,
        "kl_max": float(flat.max()),
        "kl_percentiles": {str(p): float(np.percentile(flat, p)) for p in PERCENTILES},
        "same_top_rate": top,
        "same_top_rate_se": top_se,
        "rms_dp": float(np.sqrt(ms)),
        "rms_dp_se": None if ms_se is None or ms == 0 else float(ms_se / (2 * np.sqrt(ms))),
        "ln_ppl_ratio_b_over_a": lppl,
        "ln_ppl_ratio_se": lppl_se,
        "js_mean": js_mean,
        "js_se": js_se,
        "js_percentiles": {str(p): float(np.percentile(js_flat, p)) for p in PERCENTILES},
    }


SUMMARY_NOTES = [
    "per-token statistics over every sampled position of one side's responses; standard "
    "errors are clustered by prompt (cluster-robust variance of the ratio estimator), not "
    "treating tokens as independent",
    "dp = P_B(x) - P_A(x) of the sampled token x; ln_ppl_ratio_b_over_a = ln(PPL_B / PPL_A) "
    "on that side's text = mean of log P_A(x) - log P_B(x)",
]


def what_changed(
    units: dict[int, PairScores],
    categories: dict[int, str | None],
    decode: Any,
    n_tokens: int = 20,
) -> dict[str, Any]:
    """The tokens B raises and lowers most, over every scored position: ``overall`` (every
    unit once) and ``by_category`` (prompts without a category in none; any category name,
    ``"(all)"`` included, is a category like the others). See
    :mod:`divscope.divergence.attribution`."""

    def tokens(us: list[PairScores]) -> dict[str, Any]:
        sums = np.sum([u.changed for u in us], axis=0)
        changed = WhatChanged.from_sums(sums, sum(u.n_positions for u in us))
        return {"positions": changed.n_pos, **changed.tokens(decode, n_tokens)}

    groups: dict[str, list[PairScores]] = {}
    for i, u in units.items():
        if categories.get(i):
            groups.setdefault(str(categories[i]), []).append(u)
    return {
        "overall": tokens(list(units.values())),
        "by_category": {name: tokens(us) for name, us in groups.items()},
    }


def summary_line(s: dict[str, Any], n_prompts: int) -> str:
    """One side's summary in a line: the mean KL with its standard error (clustered by prompt;
    with one prompt there is none, said as such, not as +- 0), the same-top-token rate and the
    perplexity ratio."""
    se = s.get("kl_se")
    why = "one prompt gives" if n_prompts == 1 else "these prompts give"
    err = f" +- {se:.2g}" if se is not None else f" ({why} no standard error)"
    return (
        f"{s['kl_direction']} {s['kl_mean']:.4g}{err} nats/token, "
        f"same top token {s['same_top_rate']:.1%}, "
        f"ln(PPL_B/PPL_A) {s['ln_ppl_ratio_b_over_a']:.4g}"
    )
