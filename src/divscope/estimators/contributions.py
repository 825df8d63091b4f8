"""Per-token contributions to a prompt's score, for token-level views."""

from __future__ import annotations

import numpy as np

from divscope.estimators.topk import Padded, legacy_contributions
from divscope.samples.records import PromptSamples


def spread_over_text(
    a_tokens: list[str], b_tokens: list[str], b_logprobs: np.ndarray
) -> np.ndarray:
    """B's log-probability of a text, re-cut along A's tokens of the same text.

    Each B token's logprob is spread evenly over its characters; A's token t receives the
    part that falls within its characters. Positions are compared as fractions of each side's
    decoded length, which is exact when both decode to the same string and a close
    approximation when byte-fallback tokens decode to fewer characters on one side. The
    result sums to ``b_logprobs.sum()``. Shape ``(len(a_tokens),)``.
    """
    b_len = np.array([len(t) for t in b_tokens], dtype=np.float64)
    a_len = np.array([len(t) for t in a_tokens], dtype=np.float64)
    if b_len.sum() == 0 or a_len.sum() == 0:
        out = np.zeros(len(a_tokens))
        if len(a_tokens):
            out[-1] = b_logprobs.sum()
        return out
    xb = np.concatenate([[0.0], np.cumsum(b_len) / b_len.sum()])
    yb = np.concatenate([[0.0], np.cumsum(b_logprobs)])
    # zero-width B tokens repeat an x: keep the last y of each x so their mass is not lost
    keep = np.append(xb[1:] != xb[:-1], True)
    xb, yb = xb[keep], yb[keep]
    xb[0], yb[0] = 0.0, 0.0
    xa = np.concatenate([[0.0], np.cumsum(a_len) / a_len.sum()])
    cum = np.interp(xa, xb, yb)
    cum[-1] = b_logprobs.sum()
    return np.diff(cum)


def token_contributions(
    a: PromptSamples, b: PromptSamples, response: int = 0, *, model_b: str | None = None
) -> tuple[list[str], np.ndarray, str]:
    """What each token of one of A's responses contributes to A-vs-B, in nats.

    * Aligned cross-score under ``model_b`` (same tokenizer): ``log P_A(x_t) - log P_B(x_t)``,
      the per-token terms of ``mc_kl_ab``.
    * Cross-score in B's own tokenisation: ``log P_A(x_t)`` minus B's log-probability of the
      same stretch of text (:func:`spread_over_text`). The terms add up to the response's
      ``mc_kl_ab`` numerator.
    * No cross-score: the legacy heuristic's terms ``p log(p/q)`` averaged over B's responses
      where the token was matched (NaN where never).

    Returns:
        ``(tokens, values, kind)`` with values of shape ``(T,)`` and kind ``"mc_kl"`` or
        ``"legacy_aligned"``.
    """
    r = a.usable[response]
    c = r.cross.get(model_b) if model_b else None
    if c is not None and c.aligned:
        return r.scores.tokens, r.scores.logprobs - c.scores.logprobs, "mc_kl"
    if c is not None and not np.isnan(c.scores.logprobs).any():
        b_share = spread_over_text(r.scores.tokens, c.scores.tokens, c.scores.logprobs)
        return r.scores.tokens, r.scores.logprobs - b_share, "mc_kl"
    terms, matched = legacy_contributions(
        Padded.from_scores([r.scores]), Padded.from_scores([x.scores for x in b.usable])
    )
    t = len(r.scores)
    n = matched[0].sum(0)
    vals = np.full(t, np.nan)
    with np.errstate(invalid="ignore", divide="ignore"):
        vals[: n.shape[0]] = np.where(n > 0, terms[0].sum(0) / n, np.nan)
    return r.scores.tokens, vals, "legacy_aligned"
