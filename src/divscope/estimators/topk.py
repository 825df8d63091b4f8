"""Divergence estimates from API log-probabilities (sampled token + top-k), in nats.

No exact KL exists from top-k logprobs. What is computed here is honest about that:

* :func:`mc_kl_terms` — the Monte Carlo estimate of the per-token KL rate,
  ``mean_x [log P(x) - log Q(x)]`` over tokens x sampled from P. Each term's expectation
  given its prefix is the exact KL at that position; the rate over responses of varying length
  (sum / sum) is a ratio estimator: consistent, not exactly unbiased for few responses. A
  single sample can be negative.
* :func:`coarse_bounds` — at each position, keep the tokens whose probability is known in
  both P and Q, merge the rest of each distribution into one tail bucket, and compute KL and
  JS of those coarse distributions. By the data-processing inequality both are lower bounds
  of the true per-position KL(P||Q) and JS(P, Q).
* :func:`legacy_matrix` — the older position-aligned heuristic (not a divergence; can be
  negative), kept so old results can be compared.

All inputs are natural-log probabilities; -inf means probability 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from divscope.samples.records import TokenScores

LN2 = float(np.log(2.0))
# A tail mass below this is rounding in the API's logprobs. Raising Q's tail to it can only
# lower p*log(p/q), so the coarse KL stays a lower bound (see coarse_bounds).
TAIL_FLOOR = 1e-12


def plogratio(lp: np.ndarray, lq: np.ndarray) -> np.ndarray:
    """Elementwise ``p * (log p - log q)`` from logs, with ``0 * anything = 0``."""
    with np.errstate(invalid="ignore", over="ignore"):
        out = np.exp(lp) * (lp - lq)
    return np.where(np.isneginf(lp), 0.0, out)


def mc_kl_terms(p: TokenScores, q: TokenScores, aligned: bool, n_bytes: int) -> tuple[float, int]:
    """Sum of ``log P(x) - log Q(x)`` over one response sampled from P, and its normaliser.

    Args:
        p: The generating model's scores of its response, T positions.
        q: The other model's scores of the same response (cross-score).
        aligned: Whether ``q`` scores ``p``'s tokens position by position (same tokenizer).
        n_bytes: UTF-8 length of the response text (normaliser when not aligned).

    Returns:
        ``(sum, count)``: count is the number of tokens (aligned) or of bytes (not aligned);
        the estimate over several responses is ``sum(sums) / sum(counts)`` (normalised once).
        ``(nan, 0)`` when Q lacks a logprob anywhere in the sequence.
    """
    if np.isnan(q.logprobs).any():
        return float("nan"), 0
    if aligned:
        return float(np.sum(p.logprobs - q.logprobs)), len(p)
    return float(p.logprobs.sum() - q.logprobs.sum()), n_bytes


def positions_last(scores: list[TokenScores]) -> tuple[np.ndarray, np.ndarray]:
    """Sampled token then top-k of one or more responses, their positions concatenated:
    ids ``(1 + K, T)`` (-1 padded) and logprobs ``(1 + K, T)`` (-inf padded)."""
    k = max(s.top_ids.shape[1] for s in scores)
    n = sum(len(s) for s in scores)
    ids = np.full((1 + k, n), -1, dtype=np.int64)
    lps = np.full((1 + k, n), -np.inf)
    at = 0
    for s in scores:
        m, kk = len(s), s.top_ids.shape[1]
        ids[0, at : at + m] = s.ids
        lps[0, at : at + m] = s.logprobs
        ids[1 : 1 + kk, at : at + m] = s.top_ids.T
        lps[1 : 1 + kk, at : at + m] = s.top_logprobs.T
        at += m
    return ids, lps


def _dedupe(ids: np.ndarray) -> np.ndarray:
    """``(K, T)`` ids with padding and every later duplicate in a column set to -1."""
    out = np.where(ids < 0, -1, ids)
    for i in range(1, len(ids)):
        out[i][(ids[:i] == ids[i]).any(0)] = -1
    return out


def coarse_bounds_columns(
    p_ids: np.ndarray, p_lps: np.ndarray, q_ids: np.ndarray, q_lps: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`coarse_bounds` on :func:`positions_last` arrays ``(1 + K, T)``.

    Positions last keeps numpy's inner loops long; the positions of many responses can be
    scored in one call.

    Returns:
        ``(kl, js)``, each ``(T,)``, nats; NaN where a sampled token's logprob is missing.
    """
    p_ids = _dedupe(p_ids).astype(np.int32)
    q_ids = _dedupe(q_ids).astype(np.int32)
    p_ids[p_ids < 0] = -2  # never equal to Q's -1
    lq = np.full(p_lps.shape, -np.inf)  # Q's logprob of each of P's entries, where known
    in_both = np.zeros(p_ids.shape, dtype=bool)
    for j in range(len(q_ids)):  # after _dedupe, each of P's entries matches at most once
        hit = p_ids == q_ids[j]
        np.copyto(lq, q_lps[j], where=hit)
        in_both |= hit
    lp = np.where(in_both, p_lps, -np.inf)
    # Coarse distributions: the K known entries, then the tail 1 - known mass (Q's floored).
    k = len(lp)
    lp_all, lq_all = np.empty((k + 1, lp.shape[1])), np.empty((k + 1, lp.shape[1]))
    p, q = np.empty_like(lp_all), np.empty_like(lp_all)
    lp_all[:k], lq_all[:k] = lp, lq
    np.exp(lp, out=p[:k])
    np.exp(lq, out=q[:k])
    p[k] = np.maximum(1.0 - p[:k].sum(0), 0.0)
    q[k] = np.maximum(1.0 - q[:k].sum(0), TAIL_FLOOR)
    with np.errstate(divide="ignore", invalid="ignore"):
        lp_all[k], lq_all[k] = np.log(p[k]), np.log(q[k])
        lm = np.log(0.5 * (p + q))
        kl = np.where(p > 0, p * (lp_all - lq_all), 0.0).sum(0)
        js = 0.5 * (
            np.where(p > 0, p * (lp_all - lm), 0.0) + np.where(q > 0, q * (lq_all - lm), 0.0)
        ).sum(0)
    missing = np.isnan(p_lps[0]) | np.isnan(q_lps[0])
    kl = np.where(missing, np.nan, np.maximum(kl, 0.0))
    js = np.where(missing, np.nan, np.clip(js, 0.0, LN2))
    return kl, js


def coarse_bounds(p: TokenScores, q: TokenScores) -> tuple[np.ndarray, np.ndarray]:
    """Per-position lower bounds of KL(P||Q) and JS(P, Q) from known probabilities.

    At position t let S_t be the tokens whose probability is known under both P and Q (the
    sampled token and top-k entries present on both sides). The coarse distributions are
    ``(P(x) for x in S_t) + [1 - P(S_t)]`` and the same for Q; KL and JS of these are lower
    bounds of the full-vocabulary values (data-processing inequality).

    Args:
        p: P's scores of the response, ``(T,)`` tokens and ``(T, K)`` top-k.
        q: Q's aligned scores of the same tokens, ``(T,)`` and ``(T, K')``.

    Returns:
        ``(kl, js)``, each of shape ``(T,)``, in nats; NaN where a logprob is missing.
    """
    return coarse_bounds_columns(*positions_last([p]), *positions_last([q]))


@dataclass
class Padded:
    """Responses of one model to one prompt, padded to ``(n, T)`` / ``(n, T, K)``."""

    ids: np.ndarray  # (n, T), -2 padded
    logprobs: np.ndarray  # (n, T), 0 padded
    top_ids: np.ndarray  # (n, T, K), -1 padded
    top_logprobs: np.ndarray  # (n, T, K), -inf padded
    lengths: np.ndarray  # (n,)

    @classmethod
    def from_scores(cls, scores: list[TokenScores]) -> Padded:
        n = len(scores)
        t = max((len(s) for s in scores), default=0)
        k = max((s.top_ids.shape[1] for s in scores), default=0)
        out = cls(
            ids=np.full((n, t), -2, dtype=np.int64),
            logprobs=np.zeros((n, t)),
            top_ids=np.full((n, t, k), -1, dtype=np.int64),
            top_logprobs=np.full((n, t, k), -np.inf),
            lengths=np.array([len(s) for s in scores], dtype=np.int64),
        )
        for i, s in enumerate(scores):
            m, kk = len(s), s.top_ids.shape[1]
            out.ids[i, :m] = s.ids
            out.logprobs[i, :m] = s.logprobs
            out.top_ids[i, :m, :kk] = s.top_ids
            out.top_logprobs[i, :m, :kk] = s.top_logprobs
        return out


def legacy_contributions(a: Padded, b: Padded) -> tuple[np.ndarray, np.ndarray]:
    """Per-token terms of the legacy position-aligned heuristic, direction a -> b.

    For response pair (i, j) and position t < min(len_i, len_j): x = a_i's token at t,
    p = its probability under a; q = b_j's probability of x at the same position, taken from
    b_j's sampled token or its top-k; the term is ``p * log(p / q)``, and positions where x is
    not found are not matched. This is a heuristic: the two positions have different contexts.

    Returns:
        ``(terms, matched)``, both ``(n_a, n_b, T)``; terms are 0 where not matched.
    """
    t = min(a.ids.shape[1], b.ids.shape[1])
    x = a.ids[:, None, :t]
    lp = a.logprobs[:, None, :t]
    same = b.ids[None, :, :t] == x
    # top-k with positions last, (n_b, K, t): long inner loops for numpy
    top_ids = np.ascontiguousarray(b.top_ids[:, :t].transpose(0, 2, 1))
    top_lps = np.ascontiguousarray(b.top_logprobs[:, :t].transpose(0, 2, 1))
    top_eq = top_ids[None] == x[:, :, None, :]  # (n_a, n_b, K, t)
    lq_top = np.where(top_eq, top_lps[None], -np.inf).max(2, initial=-np.inf)
    lq = np.where(same, b.logprobs[None, :, :t], lq_top)
    pos = np.arange(t)
    valid = (pos < a.lengths[:, None, None]) & (pos < b.lengths[None, :, None])
    matched = valid & (same | top_eq.any(2))
    terms = np.where(matched, plogratio(np.broadcast_to(lp, lq.shape), lq), 0.0)
    return terms, matched


def legacy_matrix(a: Padded, b: Padded) -> tuple[np.ndarray, np.ndarray]:
    """Sums and matched counts of the legacy heuristic per response pair, ``(n_a, n_b)`` each."""
    terms, matched = legacy_contributions(a, b)
    return terms.sum(-1), matched.sum(-1)
