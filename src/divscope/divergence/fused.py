"""The divergence core on log-probabilities (torch), in nats.

For distributions P, Q over the last axis given as log-probabilities ``lp``, ``lq`` of shape
``(..., vocab)``:

* ``KL(P||Q) = sum_x P(x) (log P(x) - log Q(x))``
* ``JS(P, Q) = 0.5 KL(P||M) + 0.5 KL(Q||M)``, ``log M = logaddexp(lp, lq) - log 2``;
  ``0 <= JS <= ln 2``.

Terms with ``P(x) = 0`` count 0 (also where ``log Q(x) = -inf``). Everything is computed in
fp32 or wider (inputs in bf16/fp16 are promoted). Outputs have shape ``(...)``.
"""

from __future__ import annotations

import math

import torch

from divscope.divergence.losses import js_from_logprobs, kl_from_logprobs

LN2 = math.log(2.0)


def _wide(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def kl(lp: torch.Tensor, lq: torch.Tensor) -> torch.Tensor:
    """KL(P||Q) in nats over the last axis. Shapes ``(..., V) -> (...)``."""
    return kl_from_logprobs(_wide(lp), _wide(lq))


def js(lp: torch.Tensor, lq: torch.Tensor) -> torch.Tensor:
    """Jensen-Shannon divergence in nats over the last axis. ``(..., V) -> (...)``."""
    return js_from_logprobs(_wide(lp), _wide(lq))


def js_and_kls(
    lp: torch.Tensor, lq: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(JS(P,Q), KL(P||Q), KL(Q||P))`` per position, sharing one ``exp`` of each input.

    Shapes ``(..., V) -> (...)`` each (inputs broadcast), nats; the math of
    :func:`_js_and_kls_rows`.
    """
    js_, kl_pq, kl_qp = _js_and_kls_rows(_wide(lp), _wide(lq)).unbind(0)
    return js_, kl_pq, kl_qp


def _js_and_kls_rows(lp: torch.Tensor, lq: torch.Tensor) -> torch.Tensor:
    """JS, KL(P||Q), KL(Q||P) per position: ``(..., V) -> (3, ...)``.

    ``lp`` broadcasts against ``lq``. Written so that a compiler can fuse it into one pass
    over the vocabulary.
    """
    p, q = lp.exp(), lq.exp()
    # log M = log((P + Q) / 2): one log instead of logaddexp's exp + log1p; where both
    # underflow to 0 there is no mass and the terms below are 0 anyway
    m = 0.5 * (p + q)
    lm = torch.where(m > 0, m, 1.0).log()
    kl_pq = torch.where(p > 0, p * (lp - lq), 0.0)
    kl_qp = torch.where(q > 0, q * (lq - lp), 0.0)
    js_ = 0.5 * torch.where(p > 0, p * (lp - lm), 0.0) + 0.5 * torch.where(
        q > 0, q * (lq - lm), 0.0
    )
    return torch.stack([js_.sum(-1), kl_pq.sum(-1), kl_qp.sum(-1)])


_compiled: dict[str, object] = {}


def _fused(fn, *args: torch.Tensor) -> torch.Tensor:
    """``fn(*args)`` through ``torch.compile`` when it works (``DIVSCOPE_COMPILE=0`` or any
    compiler failure: eager, same values)."""
    import os

    name = fn.__name__
    if os.environ.get("DIVSCOPE_COMPILE", "1") != "0" and _compiled.get(name) is not False:
        try:
            if name not in _compiled:
                _compiled[name] = torch.compile(fn, dynamic=True)
            return _compiled[name](*args)
        except Exception:  # noqa: BLE001 - no working compiler: eager gives the same values
            _compiled[name] = False
    return fn(*args)


def js_and_kls_sums(lp: torch.Tensor, lq: torch.Tensor) -> torch.Tensor:
    """Sums over positions of JS, KL(P||Q), KL(Q||P): ``(B, T, V) -> (3, B)`` in float64.

    The per-position sums over the vocabulary (:func:`_js_and_kls_rows`) are fused into one
    pass (``torch.compile``, eager fallback); positions are summed in float64.
    """
    return _fused(_js_and_kls_rows, _wide(lp), _wide(lq)).double().sum(-1)


def _js_and_kls_logits(xp: torch.Tensor, xq: torch.Tensor) -> torch.Tensor:
    """:func:`_js_and_kls_rows` of ``log_softmax(xp)`` and ``log_softmax(xq)``."""
    lp = xp - torch.logsumexp(xp, -1, keepdim=True)
    lq = xq - torch.logsumexp(xq, -1, keepdim=True)
    return _js_and_kls_rows(lp, lq)


def _kl_logits(xp: torch.Tensor, xq: torch.Tensor) -> torch.Tensor:
    """KL(P||Q) per position of ``P = softmax(xp)``, ``Q = softmax(xq)``: ``(..., V) -> (...)``
    (``xp`` broadcasts); three ``exp`` per entry (two normalisers, ``P``) instead of
    :func:`_js_and_kls_logits`' four and a ``log``."""
    lp = xp - torch.logsumexp(xp, -1, keepdim=True)
    lq = xq - torch.logsumexp(xq, -1, keepdim=True)
    p = lp.exp()
    return torch.where(p > 0, p * (lp - lq), 0.0).sum(-1)


def _position_terms_logits(xp: torch.Tensor, xq: torch.Tensor) -> torch.Tensor:
    """JS, KL(P||Q), KL(Q||P) and both log-normalisers per position: ``(T, V) -> (5, T)``."""
    lse_p = torch.logsumexp(xp, -1, keepdim=True)
    lse_q = torch.logsumexp(xq, -1, keepdim=True)
    rows = _js_and_kls_rows(xp - lse_p, xq - lse_q)
    return torch.cat([rows, lse_p.squeeze(-1)[None], lse_q.squeeze(-1)[None]])


def js_and_kls_from_logits(
    xp: torch.Tensor, xq: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per position from logits ``(T, V)`` each: ``(JS, KL(P||Q), KL(Q||P), logsumexp(xp),
    logsumexp(xq))``, ``(T,)`` each, nats; one fused pass, no normalised ``(T, V)`` tensor
    written (``log P = xp - logsumexp(xp)``)."""
    js_, kl_pq, kl_qp, lse_p, lse_q = _fused(_position_terms_logits, _wide(xp), _wide(xq))
    return js_, kl_pq, kl_qp, lse_p, lse_q


def js_and_kls_sums_from_logits(xp: torch.Tensor, xq: torch.Tensor) -> torch.Tensor:
    """Like :func:`js_and_kls_sums` but from logits: ``P = softmax(xp)``, ``Q = softmax(xq)``.

    Shapes ``(1 or B, T, V)`` and ``(B, T, V)`` -> ``(3, B)`` float64 sums over positions,
    nats. The log-softmax normalisers are computed in the same fused pass, so no normalised
    ``(B, T, V)`` tensor is ever written.
    """
    return _fused(_js_and_kls_logits, _wide(xp), _wide(xq)).double().sum(-1)


def kl_sums_from_logits(xp: torch.Tensor, xq: torch.Tensor) -> torch.Tensor:
    """Sums over positions of KL(P||Q), ``P = softmax(xp)``, ``Q = softmax(xq)``, in nats.

    Shapes ``(1 or B, T, V)`` and ``(B, T, V)`` -> ``(B,)`` float64; one fused pass (the KL of
    :func:`js_and_kls_sums_from_logits` without the JS terms, for callers that need only it).
    """
    return _fused(_kl_logits, _wide(xp), _wide(xq)).double().sum(-1)
