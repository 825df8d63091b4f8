"""Model pairs with exact answers, for measuring how often intervals cover the truth.

Bigram language models over a small vocabulary: token ``V`` ends a sequence (as a column) and
is the start state (as a row). The KL rate ``E[log P_A(y) - log P_B(y)] / E[|y|]`` for
``y ~ A`` has a closed form (expected visits of each state of an absorbing Markov chain times
that state's KL, over the expected length), so the coverage of an interval built from a few
sampled responses can be counted exactly: the setting of a prompt's ``mc_kl`` with k
responses. Used by ``tests/test_intervals.py`` and ``benchmarks/bench_intervals.py``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import stats

from divscope.estimators.intervals import clip_interval, ratio_variance


def bigram(seed: int, v: int = 6, alpha: float = 0.5, end: float = 0.08) -> np.ndarray:
    """``(v + 1 previous, v + 1 next)`` transition probabilities, Dirichlet(``alpha``) rows;
    every state ends with probability at least ``end``."""
    p = np.random.default_rng(seed).dirichlet(np.full(v + 1, alpha), size=v + 1)
    p[:, v] = np.maximum(p[:, v], end)
    return p / p.sum(1, keepdims=True)


def exact_kl_rate(a: np.ndarray, b: np.ndarray) -> float:
    """The exact KL rate of bigram ``a`` against ``b`` on ``a``'s sequences (nats/token)."""
    v = len(a) - 1
    q = np.zeros_like(a)
    q[:, :v] = a[:, :v]
    visits = np.linalg.inv(np.eye(v + 1) - q)[v]
    kl = (a * (np.log(a) - np.log(b))).sum(1)
    return float(visits @ kl / visits.sum())


def sample_terms(
    a: np.ndarray, b: np.ndarray, n_seq: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """``n_seq`` sequences from ``a``, all at once: per sequence the summed
    ``log P_A - log P_B`` of its tokens (end token included) and its length."""
    v = len(a) - 1
    s, n = np.zeros(n_seq), np.zeros(n_seq)
    state = np.full(n_seq, v)
    alive = np.ones(n_seq, dtype=bool)
    cum = a.cumsum(1)
    while alive.any():
        idx = np.flatnonzero(alive)
        u = rng.random(len(idx))
        tok = np.minimum((u[:, None] > cum[state[idx]]).sum(1), v)
        s[idx] += np.log(a[state[idx], tok]) - np.log(b[state[idx], tok])
        n[idx] += 1
        state[idx] = tok
        alive[idx[tok == v]] = False
    return s, n


@dataclass(frozen=True)
class Pair:
    """A named model pair: A generates, the rate is KL(A || B)."""

    name: str
    a: np.ndarray
    b: np.ndarray


def _temperature(a: np.ndarray, t: float) -> np.ndarray:
    b = a ** (1.0 / t)
    return b / b.sum(1, keepdims=True)


def pairs() -> list[Pair]:
    """The three pairs of the coverage study: the tests' bigram pair (B mixes A with another
    model) and two sampling-temperature changes of a longer-sequence model (T = 1.5, 0.7)."""
    a1 = bigram(1)
    a7 = bigram(7, v=10, alpha=0.5, end=0.05)
    return [
        Pair("bigram_mix", a1, 0.6 * a1 + 0.4 * bigram(2)),
        Pair("temperature_1.5", a7, _temperature(a7, 1.5)),
        Pair("temperature_0.7", a7, _temperature(a7, 0.7)),
    ]


def stress_pairs() -> list[Pair]:
    """Pairs where no t-interval over 4-8 responses covers at its nominal rate: per-response
    log-ratio sums with a heavy left tail (tokens A rarely samples that B favours), so the
    estimate and its spread are small together. Reported beside the study, not hidden."""
    a3 = bigram(3)
    a5 = bigram(5, v=12, alpha=0.3, end=0.03)
    return [
        Pair("stress_unrelated", a3, bigram(4)),
        Pair("stress_mix", a3, 0.7 * a3 + 0.3 * bigram(4)),
        Pair("stress_sparse_long", a5, 0.85 * a5 + 0.15 * bigram(6, v=12, alpha=0.3, end=0.03)),
    ]


def coverage(
    pair: Pair,
    k: int,
    replicates: int,
    rng: np.random.Generator,
    ci_level: float = 0.95,
) -> dict[str, float]:
    """Coverage of the exact rate by the t-intervals of ``replicates`` prompts' worth of ``k``
    responses each, with the delta-method and the jackknife standard errors, and the ratio
    estimator's relative bias."""
    truth = exact_kl_rate(pair.a, pair.b)
    s, n = (x.reshape(replicates, k) for x in sample_terms(pair.a, pair.b, replicates * k, rng))
    r = s.sum(1) / n.sum(1)
    t = stats.t.ppf(0.5 + ci_level / 2, k - 1)
    out: dict[str, float] = {"truth": truth, "bias_rel": float(r.mean() / truth - 1)}
    for method in ("delta", "jackknife"):
        half = t * np.sqrt(ratio_variance(s, n, method))
        lo, hi = clip_interval(r - half, r + half, 0.0, None)
        out[f"coverage_{method}"] = float(np.mean((lo <= truth) & (truth <= hi)))
        out[f"median_width_{method}"] = float(np.median(hi - lo))
    return out
