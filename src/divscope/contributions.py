"""Per-token contributions to a prompt's score, for token-level views."""

from __future__ import annotations

import numpy as np

from divscope.samples import PromptSamples
from divscope.topk import Padded, legacy_contributions


def token_contributions(
    a: PromptSamples, b: PromptSamples, response: int = 0, *, model_b: str | None = None
) -> tuple[list[str], np.ndarray, str]:
    """What each token of one of A's responses contributes, in nats.

    With an aligned cross-score under ``model_b``: ``log P_A(x_t) - log P_B(x_t)``, the
    per-token terms of ``mc_kl_ab``. Otherwise the legacy heuristic's terms
    ``p log(p/q)`` averaged over B's responses where the token was matched (NaN where never).

    Args:
        a: Model A's samples for the prompt.
        b: Model B's samples for the same prompt.
        response: Index into ``a.usable``.
        model_b: B's model name (for the cross-score lookup).

    Returns:
        ``(tokens, values, kind)`` with values of shape ``(T,)`` and kind
        ``"mc_kl"`` or ``"legacy_aligned"``.
    """
    r = a.usable[response]
    c = r.cross.get(model_b) if model_b else None
    if c is not None and c.aligned:
        return r.scores.tokens, r.scores.logprobs - c.scores.logprobs, "mc_kl"
    terms, matched = legacy_contributions(
        Padded.from_scores([r.scores]), Padded.from_scores([x.scores for x in b.usable])
    )
    t = len(r.scores)
    n = matched[0].sum(0)
    vals = np.full(t, np.nan)
    with np.errstate(invalid="ignore", divide="ignore"):
        vals[: n.shape[0]] = np.where(n > 0, terms[0].sum(0) / n, np.nan)
    return r.scores.tokens, vals, "legacy_aligned"
