"""Score every prompt of two sample files and rank them by how differently the models answer.

Metrics (each in both directions ``_ab`` = on A's samples, ``_ba`` = on B's samples, and
their mean without suffix):

* ``mc_kl`` — Monte Carlo KL rate, needs cross-scores. nats/token for a shared tokenizer,
  nats/byte otherwise (sequence log-probabilities of the same text).
* ``topk_kl_lb``, ``topk_js_lb`` — lower bounds, ``topk_js_ub`` — the JS upper bound: certified
  per position from the listed logprobs (:mod:`divscope.estimators.bounds`), need aligned
  cross-scores with top-k. nats/position. On the sampled positions the exact JS rate lies in
  ``[topk_js_lb, topk_js_ub]``; with their CIs, ``[lower end of topk_js_lb's CI, upper end of
  topk_js_ub's]`` is an interval for the prompt's JS rate, and :func:`js_separation` says which
  of the top prompts these intervals tell apart.
* ``legacy_aligned`` — the older position-aligned heuristic (not a divergence).

Uncertainty over responses: ``mc_kl`` and the top-k bounds are ratio estimators (summed terms
over summed tokens), with t-intervals on the jackknife (leave-one-response-out) standard error,
clipped to the quantity's range (:mod:`divscope.estimators.intervals`; coverage measured in
benchmarks/bench_intervals.py, where a percentile bootstrap covered 76-88%);
``legacy_aligned``, a mean over response pairs, keeps a percentile bootstrap, each model's
responses resampled independently.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from divscope.estimators.bounds import topk_bounds_columns
from divscope.estimators.intervals import Estimate, average, ratio_estimate, t_interval
from divscope.estimators.topk import LN2, Padded, legacy_matrix, mc_kl_terms, positions_last
from divscope.samples.errors import SampleFileError
from divscope.samples.read import check_same_prompts
from divscope.samples.records import PromptSamples, Response, SampleSet

BASE_METRICS = ("mc_kl", "topk_kl_lb", "topk_js_lb", "topk_js_ub", "legacy_aligned")
TOPK_METRICS = ("topk_kl_lb", "topk_js_lb", "topk_js_ub")
TOP_N_SEPARATION = 5
ALL_METRICS = tuple(f"{m}{s}" for m in BASE_METRICS for s in ("", "_ab", "_ba"))
LEGACY_NOTE = (
    "legacy_aligned is a heuristic, not a divergence: it compares tokens at the same position "
    "of different responses (different contexts) and can be negative"
)
CI_METHOD = (
    "t-interval over responses (jackknife standard error for the ratio estimators mc_kl and "
    "the top-k bounds, clipped to [0, inf), JS to [0, ln 2]); legacy_aligned: percentile "
    "bootstrap"
)
NO_CROSS_NOTE = (
    "these files carry no cross-scores, so no honest KL estimate exists; legacy_aligned is the "
    "only score (re-sample with `divscope sample` and cross_score: true for mc_kl and the "
    "top-k bounds)"
)


@dataclass
class PromptScore:
    """One prompt's scores; ``rank`` 1 is the most different, None when it cannot be scored."""

    index: int
    prompt: str
    category: str | None
    rank: int | None
    reason: str | None
    scores: dict[str, float | None]
    ci: dict[str, list[float] | None]
    coverage: dict[str, Any]
    n_responses: list[int]
    excluded_responses: list[int]
    excluded_reasons: list[list[str]] = field(default_factory=list)


@dataclass
class Ranking:
    """All prompts of a file pair, scored and ranked by ``metric``."""

    metric: str
    models: list[str]
    files: list[str]
    units: dict[str, str]
    available: list[str]
    notes: list[str]
    prompts: list[PromptScore]
    n_bootstrap: int
    ci_level: float
    ci_method: str = CI_METHOD
    js_intervals: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        """The ``divscope rank --json`` document."""
        return {
            "metric": self.metric,
            "models": self.models,
            "files": self.files,
            "units": self.units,
            "available_metrics": self.available,
            "notes": self.notes,
            "bootstrap": {"n": self.n_bootstrap, "ci_level": self.ci_level},
            "ci_method": self.ci_method,
            "js_intervals": self.js_intervals,
            "prompts": [asdict(p) for p in self.prompts],
        }

    def to_frame(self, metrics: list[str] | None = None):  # -> pandas.DataFrame
        """One row per prompt, best rank first; columns for the chosen metrics and CIs."""
        import pandas as pd

        metrics = metrics or [m for m in self.available if not m.endswith(("_ab", "_ba"))]
        rows = []
        for p in sorted(self.prompts, key=_rank_key):
            row: dict[str, Any] = {"rank": p.rank, "index": p.index, "prompt": p.prompt}
            if any(q.category for q in self.prompts):
                row["category"] = p.category
            for m in metrics:
                row[m] = p.scores.get(m)
            ci = p.ci.get(self.metric)
            row["ci_low"], row["ci_high"] = ci if ci else (None, None)
            row["n_a"], row["n_b"] = p.n_responses
            row["excluded_a"], row["excluded_b"] = p.excluded_responses
            row["reason"] = p.reason
            rows.append(row)
        return pd.DataFrame(rows)


def _rank_key(p: PromptScore) -> tuple[int, int]:
    return (p.rank if p.rank is not None else 1 << 30, p.index)


# ---------------------------------------------------------------------------- per prompt


@dataclass
class _Direction:
    """Per-response terms of one direction (samples of X scored by Y)."""

    mc_sum: np.ndarray  # (n,)
    mc_cnt: np.ndarray
    kl_sum: np.ndarray
    js_sum: np.ndarray
    ub_sum: np.ndarray
    pos_cnt: np.ndarray
    missing_cross: int


def coarse_sums(
    responses: list[Response], other: str, chunk: int = 2048
) -> dict[int, tuple[float, float, float, int]]:
    """Top-k bound sums (KL lower, JS lower, JS upper) over each response's positions, for
    all responses at once.

    Responses are processed in groups of about ``chunk`` positions, each laid out positions
    last (what :func:`divscope.estimators.bounds.topk_bounds_columns` wants) straight from the
    responses' arrays, so nothing of the size of the whole file is built.

    Returns:
        ``id(response) -> (kl_lb_sum, js_lb_sum, js_ub_sum, positions)`` for responses with an
        aligned top-k cross-score under ``other`` (positions missing a logprob drop out).
    """
    todo = [
        r
        for r in responses
        if other in r.cross
        and r.cross[other].aligned
        and r.cross[other].scores.top_ids.shape[1]
        and r.scores.top_ids.shape[1]
    ]
    out: dict[int, tuple[float, float, float, int]] = {}
    group: list[Response] = []
    size = 0
    for i, r in enumerate(todo):
        group.append(r)
        size += len(r.scores)
        if size >= chunk or i == len(todo) - 1:
            cols = [
                x
                for s in ([g.scores for g in group], [g.cross[other].scores for g in group])
                for x in positions_last(s)
            ]
            bd = topk_bounds_columns(*cols)
            ok = ~np.isnan(bd.kl_lb)
            starts = np.cumsum([0] + [len(g.scores) for g in group[:-1]])
            sums = [
                np.add.reduceat(np.where(ok, v, 0.0), starts)
                for v in (bd.kl_lb, bd.js_lb, bd.js_ub)
            ]
            cnt = np.add.reduceat(ok.astype(np.int64), starts)
            for g, a, b, u, c in zip(group, *sums, cnt, strict=True):
                out[id(g)] = (float(a), float(b), float(u), int(c))
            group, size = [], 0
    return out


def _direction_terms(
    responses: list[Response],
    other: str,
    per_byte: bool,
    coarse: dict[int, tuple[float, float, float, int]] | None = None,
) -> _Direction | None:
    if not responses or not all(other in r.cross for r in responses):
        return None
    if per_byte:  # two vocabularies: no top-k bound (it compares one vocabulary's tokens)
        coarse = {}
    elif coarse is None:
        coarse = coarse_sums(responses, other)
    mc_sum, mc_cnt, kl_sum, js_sum, ub_sum, pos_cnt = [], [], [], [], [], []
    missing = 0
    for r in responses:
        c = r.cross[other]
        s, n = mc_kl_terms(r.scores, c.scores, c.aligned and not per_byte, r.n_bytes)
        missing += c.scores.n_missing
        mc_sum.append(s if n else 0.0)  # a response Q could not fully score drops out
        mc_cnt.append(n)
        kl, js, ub, cnt = coarse.get(id(r), (0.0, 0.0, 0.0, 0))
        kl_sum.append(kl)
        js_sum.append(js)
        ub_sum.append(ub)
        pos_cnt.append(cnt)
    return _Direction(
        *(
            np.asarray(v, dtype=np.float64)
            for v in (mc_sum, mc_cnt, kl_sum, js_sum, ub_sum, pos_cnt)
        ),
        missing_cross=missing,
    )


def _legacy_values(sums: np.ndarray, cnts: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(cnts > 0, sums / np.maximum(cnts, 1), np.nan)


def _nanmean(x: np.ndarray, axis: tuple[int, ...] | int | None = None) -> np.ndarray:
    ok = ~np.isnan(x)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(ok, x, 0.0).sum(axis) / ok.sum(axis)


def score_prompt(
    ra: PromptSamples,
    rb: PromptSamples,
    *,
    model_a: str,
    model_b: str,
    per_byte: bool,
    n_bootstrap: int,
    ci_level: float,
    rng: np.random.Generator,
    coarse: dict[int, tuple[float, float, float, int]] | None = None,
) -> PromptScore:
    """Every available metric for one prompt, with CIs over responses (see the module doc).

    ``coarse`` holds precomputed :func:`coarse_sums` for both directions (computed here when
    None).
    """
    ps = _prompt_score(ra, rb)
    ua, ub = ra.usable, rb.usable
    if not ua or not ub:
        side = "A" if not ua else "B"
        ps.reason = f"no response of model {side} carries logprobs"
        return ps
    na, nb = len(ua), len(ub)
    ia = rng.integers(0, na, size=(n_bootstrap, na))
    ib = rng.integers(0, nb, size=(n_bootstrap, nb))
    boots: dict[str, np.ndarray] = {}
    dirs = {
        "_ab": _direction_terms(ua, model_b, per_byte, coarse),
        "_ba": _direction_terms(ub, model_a, per_byte, coarse),
    }
    estimates = _cross_metrics(ps, dirs, per_byte)
    for name in ("mc_kl", *TOPK_METRICS):
        if name + "_ab" in estimates and name + "_ba" in estimates:
            estimates[name] = average(estimates[name + "_ab"], estimates[name + "_ba"])
    for name, e in estimates.items():
        ps.scores[name] = e.value
        ps.ci[name] = t_interval(e, ci_level, metric_range(name))
    _legacy_metrics(ps, boots, ua, ub, ia, ib)
    if boots:
        ps.ci |= percentile_cis(boots, ci_level, n_bootstrap, min(na, nb))
    return ps


def metric_range(name: str) -> tuple[float | None, float | None]:
    """Where a metric's true value lies: ``[0, ln 2]`` for JS, ``[0, inf)`` for the other
    divergences, unbounded for the legacy heuristic (its intervals are clipped to this)."""
    if name.startswith("legacy"):
        return None, None
    if "js" in name:
        return 0.0, LN2
    return 0.0, None


def _prompt_score(ra: PromptSamples, rb: PromptSamples) -> PromptScore:
    """An unscored :class:`PromptScore` with the prompt's coverage and exclusions."""
    ua, ub = ra.usable, rb.usable
    return PromptScore(
        index=ra.index,
        prompt=ra.prompt,
        category=ra.category or rb.category,
        rank=None,
        reason=None,
        scores={},
        ci={},
        coverage={
            "n_tokens": [int(sum(len(r.scores) for r in u)) for u in (ua, ub)],
            "topk_mass": [_topk_mass(u) for u in (ua, ub)],
        },
        n_responses=[len(ra.responses), len(rb.responses)],
        excluded_responses=[len(ra.responses) - len(ua), len(rb.responses) - len(ub)],
        excluded_reasons=[
            [r.excluded_reason for r in x.responses if r.excluded_reason] for x in (ra, rb)
        ],
    )


def _cross_metrics(
    ps: PromptScore, dirs: dict[str, _Direction | None], per_byte: bool
) -> dict[str, Estimate]:
    """The honest metrics from cross-scores (mc_kl, top-k bounds) per direction, as ratio
    estimates; the cross-score coverage goes into ``ps`` in place."""
    out: dict[str, Estimate] = {}
    for suffix, d in dirs.items():
        if d is None:
            continue
        for name, s, n in (
            ("mc_kl", d.mc_sum, d.mc_cnt),
            ("topk_kl_lb", d.kl_sum, d.pos_cnt),
            ("topk_js_lb", d.js_sum, d.pos_cnt),
            ("topk_js_ub", d.ub_sum, d.pos_cnt),
        ):
            e = ratio_estimate(s, n)
            if e is not None:
                out[name + suffix] = e
    present = [d for d in dirs.values() if d is not None]
    if present:
        coverage = ps.coverage
        coverage["missing_cross_logprobs"] = sum(d.missing_cross for d in present)
        cnt = sum(int(d.mc_cnt.sum()) for d in present)
        coverage["cross_scored_share"] = (
            cnt / max(1, sum(coverage["n_tokens"])) if not per_byte else None
        )
    return out


def _legacy_metrics(
    ps: PromptScore,
    boots: dict[str, np.ndarray],
    ua: list[Response],
    ub: list[Response],
    ia: np.ndarray,
    ib: np.ndarray,
) -> None:
    """The legacy heuristic over all response pairs, both directions, in place."""
    pa = Padded.from_scores([r.scores for r in ua])
    pb = Padded.from_scores([r.scores for r in ub])
    s_ab, c_ab = legacy_matrix(pa, pb)  # (na, nb)
    s_ba, c_ba = legacy_matrix(pb, pa)  # (nb, na)
    v_ab, v_ba = _legacy_values(s_ab, c_ab), _legacy_values(s_ba, c_ba).T
    compared = sum(min(x, y) for x in pa.lengths for y in pb.lengths)
    ps.coverage["matched_token_share"] = (
        float((c_ab.sum() + c_ba.sum()) / (2 * compared)) if compared else 0.0
    )
    for suffix, v in (("_ab", v_ab), ("_ba", v_ba)):
        if not np.isnan(v).all():
            ps.scores["legacy_aligned" + suffix] = float(np.nanmean(v))
            boots["legacy_aligned" + suffix] = _nanmean(v[ia[:, :, None], ib[:, None, :]], (1, 2))
    both = np.stack([v_ab, v_ba])
    if not np.isnan(both).all():
        ps.scores["legacy_aligned"] = float(np.nanmean(both))
        boots["legacy_aligned"] = _nanmean(both[:, ia[:, :, None], ib[:, None, :]], (0, 2, 3))


def percentile_cis(
    boots: dict[str, np.ndarray], ci_level: float, n_bootstrap: int, n_min: int
) -> dict[str, list[float] | None]:
    """Percentile intervals of each metric's bootstrap values (None with one response a side
    or when fewer than 90% of the resamples are defined)."""
    alpha = (1 - ci_level) / 2
    names = list(boots)
    stacked = np.stack([boots[m] for m in names])
    finite = np.isfinite(stacked)
    if finite.all():
        q = np.quantile(stacked, [alpha, 1 - alpha], axis=1)
    else:  # nanquantile goes row by row: only when some resample is undefined
        with np.errstate(invalid="ignore"):
            q = np.nanquantile(np.where(finite, stacked, np.nan), [alpha, 1 - alpha], axis=1)
    out: dict[str, list[float] | None] = {}
    for j, name in enumerate(names):
        if n_min < 2 or finite[j].sum() < 0.9 * n_bootstrap:
            out[name] = None  # one response per side: no spread to resample
        else:
            out[name] = [float(q[0, j]), float(q[1, j])]
    return out


def _topk_mass(responses: list[Response]) -> float | None:
    masses = [
        np.exp(r.scores.top_logprobs, dtype=np.float64).sum(1)
        for r in responses
        if r.scores.top_logprobs.shape[1]
    ]
    return float(np.concatenate(masses).mean()) if masses else None


# ---------------------------------------------------------------------------- whole files


def available_metrics(a: SampleSet, b: SampleSet) -> list[str]:
    """Metrics the pair of files supports, best first."""
    out = []
    ab, ba = a.has_cross_scores(b.model), b.has_cross_scores(a.model)
    if ab and ba:
        out.append("mc_kl")
    out += [m for m, ok in (("mc_kl_ab", ab), ("mc_kl_ba", ba)) if ok]
    aligned_ab = ab and _all_aligned_topk(a, b.model)
    aligned_ba = ba and _all_aligned_topk(b, a.model)
    for base in TOPK_METRICS:
        if aligned_ab and aligned_ba:
            out.append(base)
        out += [f"{base}{s}" for s, ok in (("_ab", aligned_ab), ("_ba", aligned_ba)) if ok]
    out += ["legacy_aligned", "legacy_aligned_ab", "legacy_aligned_ba"]
    return out


def _all_aligned_topk(s: SampleSet, other: str) -> bool:
    return all(
        r.cross[other].aligned and r.cross[other].scores.top_ids.shape[1] > 0
        for rec in s.records
        for r in rec.usable
    )


def rank_prompts(
    a: SampleSet,
    b: SampleSet,
    *,
    metric: str | None = None,
    max_prompts: int | None = None,
    n_bootstrap: int = 1000,
    ci_level: float = 0.95,
    seed: int = 0,
) -> Ranking:
    """Score every prompt and rank by ``metric`` (default: the best the files support).

    Raises:
        SampleFileError: The files' prompts differ, or ``metric`` needs data they lack.
        ValueError: ``metric`` is not a known metric name.
    """
    from divscope.gcpause import paused_gc

    with paused_gc():
        return _rank_prompts(a, b, metric, max_prompts, n_bootstrap, ci_level, seed)


def _rank_prompts(
    a: SampleSet,
    b: SampleSet,
    metric: str | None,
    max_prompts: int | None,
    n_bootstrap: int,
    ci_level: float,
    seed: int,
) -> Ranking:
    check_same_prompts(a, b)
    if a.vocab is not b.vocab:
        raise ValueError("load both files with one TokenVocab (use divscope.samples.load_pair)")
    if max_prompts is not None and max_prompts < 1:
        raise ValueError(f"max_prompts must be at least 1 (got {max_prompts})")
    per_byte = two_tokenizers(a, b)
    avail = available_metrics(a, b)
    metric = _checked_metric(metric, avail, a.path, per_byte)
    rng = np.random.default_rng(seed)
    n = len(a.records) if max_prompts is None else min(max_prompts, len(a.records))
    coarse: dict[int, tuple[float, float, float, int]] = {}
    if not per_byte:  # the top-k bounds compare one vocabulary's distributions
        coarse = coarse_sums([r for rec in a.records[:n] for r in rec.usable], b.model)
        coarse |= coarse_sums([r for rec in b.records[:n] for r in rec.usable], a.model)
    prompts = [
        score_prompt(
            ra,
            rb,
            model_a=a.model,
            model_b=b.model,
            per_byte=per_byte,
            n_bootstrap=n_bootstrap,
            ci_level=ci_level,
            rng=rng,
            coarse=coarse,
        )
        for ra, rb in zip(a.records[:n], b.records[:n], strict=True)
    ]
    assign_ranks(prompts, metric, avail)
    units, notes = _units_and_notes(avail, per_byte, a.n_excluded + b.n_excluded)
    separation = js_separation(prompts, TOP_N_SEPARATION) if "topk_js_ub" in avail else None
    if separation is not None:
        notes.append(separation["summary"])
    return Ranking(
        metric,
        [a.model, b.model],
        [str(a.path), str(b.path)],
        units,
        avail,
        notes,
        prompts,
        n_bootstrap,
        ci_level,
        js_intervals=separation,
    )


def js_interval(p: PromptScore) -> tuple[list[float] | None, list[float] | None]:
    """A prompt's certified JS interval on its sampled positions ``[topk_js_lb, topk_js_ub]``
    and, with their CIs, ``[lower CI end of the lower bound, upper CI end of the upper]`` (None
    where not available; the second also with a single response)."""
    lb, ub = p.scores.get("topk_js_lb"), p.scores.get("topk_js_ub")
    if lb is None or ub is None:
        return None, None
    ci_lb, ci_ub = p.ci.get("topk_js_lb"), p.ci.get("topk_js_ub")
    wide = [ci_lb[0], ci_ub[1]] if ci_lb and ci_ub else None
    return [lb, ub], wide


def js_separation(prompts: list[PromptScore], top_n: int) -> dict[str, Any]:
    """Which pairs of the ``top_n`` best-ranked prompts the JS intervals tell apart.

    A pair is separated when its two intervals (the CI-widened ones, or the certified ones on
    the sampled positions where a CI is missing) do not overlap; the ranking among the top N is
    decided by them when every pair is separated (in the order the intervals give).

    Returns:
        ``{top_n, interval, separated: [[idx, idx], ...] (higher first), overlapping,
        decided, summary}``.
    """
    top = sorted((p for p in prompts if p.rank is not None), key=lambda p: p.rank)[:top_n]
    iv = {}
    kinds = set()
    for p in top:
        certified, wide = js_interval(p)
        if certified is not None:
            iv[p.index] = wide or certified
            kinds.add("ci" if wide else "certified")
    sep, over = [], []
    idx = list(iv)
    for i, x in enumerate(idx):
        for y in idx[i + 1 :]:
            if iv[x][0] > iv[y][1]:
                sep.append([x, y])
            elif iv[y][0] > iv[x][1]:
                sep.append([y, x])
            else:
                over.append([x, y])
    pairs = len(sep) + len(over)
    decided = pairs > 0 and not over
    kind = (
        "CI ends of the lower and upper bound"
        if kinds == {"ci"}
        else "certified bounds on the sampled positions (no CI with one response)"
        if kinds == {"certified"}
        else "CI ends where available, else the certified bounds"
    )
    summary = (
        f"JS intervals [topk_js_lb, topk_js_ub] ({kind}): of the top {len(idx)} prompts, "
        f"{len(sep)} of {pairs} pairs are separated; "
        + ("they decide the order among them" if decided else "they do not decide the order")
        + ("" if not over else " (overlapping: " + ", ".join(f"{a}~{b}" for a, b in over) + ")")
    )
    return {
        "top_n": len(idx),
        "interval": kind,
        "intervals": {str(k): v for k, v in iv.items()},
        "separated": sep,
        "overlapping": over,
        "decided": decided,
        "summary": summary,
    }


def two_tokenizers(a: SampleSet, b: SampleSet) -> bool:
    """Whether the files' cross-scores say the two models tokenize differently (some
    response's cross-score is not token-aligned): then only per-byte ``mc_kl`` exists."""
    return any(
        not c.aligned
        for s in (a, b)
        for rec in s.records
        for r in rec.usable
        for c in r.cross.values()
    )


def _checked_metric(metric: str | None, avail: list[str], path: Path, per_byte: bool) -> str:
    """``metric``, or the best available when None; raises when it is unknown or unavailable,
    with the reason: no cross-scores, two tokenizers, or no top-k in the cross-scores."""
    if metric is None:
        return avail[0]
    if metric not in ALL_METRICS:
        raise ValueError(f"unknown metric {metric!r}; choose one of {', '.join(ALL_METRICS)}")
    if metric in avail:
        return metric
    crossed = any(m.startswith("mc_kl") for m in avail)
    if not crossed or metric.startswith("mc_kl"):
        why = "needs cross-scores these files do not carry"
        fix = (
            "re-sample with `divscope sample` and cross_score: true, or choose an available metric"
        )
    elif per_byte:
        why = (
            "compares the two models' next-token distributions over one vocabulary, and these "
            "models' tokenizers differ (their cross-scores are per text, not per token)"
        )
        fix = "choose an available metric; re-sampling would not help"
    else:
        why = "needs top-k logprobs in both directions' cross-scores, which these files lack"
        fix = "re-sample with top_logprobs > 0 and cross_score: true, or choose an available metric"
    raise SampleFileError(path, f"metric {metric!r} {why} (available: {', '.join(avail)})", fix)


def _units_and_notes(
    avail: list[str], per_byte: bool, excluded: int
) -> tuple[dict[str, str], list[str]]:
    """Each available metric's unit, and the notes that go with the ranking."""
    unit_mc = "nats/byte" if per_byte else "nats/token"
    units = {
        m: (
            unit_mc
            if m.startswith("mc_kl")
            else "heuristic (nats-like, not a divergence)"
            if m.startswith("legacy")
            else "nats/position"
        )
        for m in avail
    }
    notes = [LEGACY_NOTE]
    if not any(m.startswith("mc_kl") for m in avail):
        notes.insert(0, NO_CROSS_NOTE)
    if per_byte:
        notes.append(
            "the models' tokenizers differ: mc_kl compares sequence log-probabilities "
            "of the same text, per byte; the top-k bounds compare one vocabulary's "
            "next-token distributions and do not exist here"
        )
    if excluded:
        notes.append(f"{excluded} response(s) without logprobs were excluded (never scored as 0)")
    return units, notes


def assign_ranks(prompts: list[PromptScore], metric: str, avail: list[str]) -> None:
    """Rank 1 = highest ``metric`` (ties by index); a reason for every unscored prompt; every
    available metric's key present (null where not available)."""
    scored = [p for p in prompts if p.scores.get(metric) is not None]
    for p in prompts:
        if p.scores.get(metric) is None and p.reason is None:
            p.reason = f"{metric} could not be computed (no matched tokens or missing cross-scores)"
    for r, p in enumerate(sorted(scored, key=lambda p: (-p.scores[metric], p.index)), start=1):
        p.rank = r
    for p in prompts:
        for m in avail:
            p.scores.setdefault(m, None)
            p.ci.setdefault(m, None)


def category_summary(
    ranking: Ranking, metric: str | None = None, n_bootstrap: int = 1000, seed: int = 0
) -> list[dict[str, Any]]:
    """Mean score per prompt category with a percentile bootstrap CI over its prompts.

    Returns:
        Rows ``{category, n, mean, ci_low, ci_high}``, highest mean first; the CI is None for
        a category with a single prompt.
    """
    from divscope.stats.categories import category_means

    metric = metric or ranking.metric
    by_cat: dict[str, list[float]] = {}
    for p in ranking.prompts:
        if p.scores.get(metric) is not None:
            by_cat.setdefault(p.category or "(none)", []).append(p.scores[metric])
    return category_means(by_cat, n_bootstrap, seed, ranking.ci_level)
