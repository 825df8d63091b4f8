"""Certified per-position intervals for JS (and a lower bound for KL) from top-k logprobs.

At one position, the data are: the sampled token with both models' logprobs, P's top-k and
Q's top-k. The listed tokens split into

* S: known under both (the sampled token, tokens on both lists), ``p_x``, ``q_x`` known;
* A: on P's list only, ``p_a`` known, ``q_a <= c_Q`` (``c_Q`` = Q's smallest listed probability:
  a token off Q's list is no more probable than the last one on it);
* B: on Q's list only, ``q_b`` known, ``p_b <= c_P``;

and every other token has ``p <= c_P``, ``q <= c_Q``. ``p_rest = 1 - P(S) - P(A)`` and
``q_rest = 1 - Q(S) - Q(B)`` are the masses nobody listed.

**Upper bound (JS).** With ``g(p, q) = ((p+q)/2) h(p/(p+q))`` (h the binary entropy, nats),
``f(p, q) = (ln 2 / 2)(p + q) - g(p, q)`` is the JS term, so ``JS = ln 2 - sum_x g(p_x, q_x)
<= ln 2 - sum_{x in S} g(p_x, q_x)``: every ``g >= 0``. Equality holds when the unknown masses
sit on disjoint tokens (A's ``q = 0``, B's ``p = 0``, the rest spread within the caps over
tokens of one side only), which the caps allow whenever the vocabulary has room for
``ceil(p_rest / c_P) + ceil(q_rest / c_Q)`` more tokens: no tighter bound follows from these data.

**Lower bounds (JS and KL), the capped minimum.** The exact minimum of the divergence over all
full distributions consistent with the data is the convex problem

    min  sum_S d(p, q) + sum_A d(p_a, q_a) + sum_B d(p_b, q_b) + d(P_R, Q_R)
    s.t. 0 <= q_a <= c_Q, 0 <= p_b <= c_P, sum_B p_b + P_R = p_rest, sum_A q_a + Q_R = q_rest

(the unlisted rest merges into one pair ``(P_R, Q_R)``: d is convex and 1-homogeneous, so
spreading it proportionally over enough tokens keeps every cap and the same value). Its
Lagrange dual with multipliers ``lam`` (P's mass) and ``mu`` (Q's mass) is

    G(lam, mu) = sum_S d + sum_A [d(p_a, q_a*) - mu q_a*] + sum_B [d(p_b*, q_b) - lam p_b*]
                 + lam p_rest + mu q_rest,

valid (the rest's term bounded below by 0) exactly when ``d(p, q) >= lam p + mu q`` for all
``p, q >= 0``: for JS (Gibbs' inequality) ``e^{2 lam} + e^{2 mu} <= 2``, for KL
``mu <= -e^{lam - 1}``. Weak duality makes ``G`` at ANY valid pair a lower bound; the best pair
gives the exact minimum (strong duality: a convex problem with linear constraints). In the
ratios ``r_P`` (B's minimisers ``p_b* = min(r_P q_b, c_P)``) and ``r_Q`` (A's ``q_a* =
min(r_Q p_a, c_Q)``), with ``lam = 1/2 ln(2 r_P / (1 + r_P))`` (JS) or ``1 + ln r_P`` (KL) and
``mu`` likewise (JS) or ``-1 / r_Q`` (KL), both domains are the same: ``r_P r_Q <= 1``.
``G`` separates into a concave function of ``r_P`` plus one of ``r_Q``; each's unconstrained
maximum solves a piecewise-linear equation (``sum_B p_b* = p_rest``, ``sum_A q_a* = q_rest``) in
closed form. When the two maxima satisfy ``r_P r_Q <= 1`` they are the answer; otherwise the
maximum lies on the boundary ``r_Q = 1 / r_P`` between them, where ``G`` is concave in
``ln r_P`` and the sign of its derivative is that of a piecewise-linear function: a binary
search over its breakpoints and one linear solve find it exactly (:func:`boundary_ratio`). A
rougher search would only loosen the bound, never break it. The result is never
below the tail-bucket bound of :func:`divscope.estimators.topk.coarse_bounds` (that is the
same minimum with fewer constraints), up to the slack below.

**float32 slack.** API and model logprobs are float32 numbers from a float32 log-softmax:
each stored logprob ``l`` is taken to be within ``eta(l) = 2^-16 + 2^-21 |l|`` nats of the
true one (a float32 log-normaliser of logits up to 256 in size, and 8 half-ulps of ``l``).
The upper bound is evaluated at ``l - eta(l)`` for every S entry (g is increasing in both
arguments, so this only raises it; by at most ``(1 - e^-eta) ln 2``, about 1e-5 nats); caps
are raised to ``e^{eta}`` times their value (a weaker constraint); for KL, which only falls
as Q's unknown mass grows, that mass is raised by the error of Q's listed mass (and floored at
``TAIL_FLOOR``, as the tail-bucket bound does); and each lower bound is lowered by twice its
remaining first-order sensitivity to the listed logprobs, ``2 sum_x eta_x |dG/d l_x|`` at the
chosen multipliers (second-order terms are ``O(eta^2)``): at most a few 1e-4 nats for JS, and
where Q lists almost all its mass (KL's multiplier is then large) a few 1e-3 for KL.
Listed probabilities that sum to slightly more than 1 then never produce a violation.

**Token identity** is the token string (the interned id). Where a top-k list names one string
twice (two token ids that decode alike, as API lists of byte pieces can), the pairs and caps
above are not those of single tokens, so such positions get the trivial interval: JS in
``[0, ln 2]``, KL at least 0 (:func:`repeated_strings` finds them; files written by
``divscope diff`` make every string unique).

All inputs are natural-log probabilities; -inf means probability 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.special import rel_entr

from divscope.estimators.topk import LN2, TAIL_FLOOR, _dedupe, positions_last
from divscope.samples.records import TokenScores

SLACK_ABS = 2.0**-16
SLACK_REL = 2.0**-21
_LOG_R = 60.0  # the ratios stay within e^-60 .. e^60 (the limits beyond change nothing)


def slack(lp: np.ndarray) -> np.ndarray:
    """The documented float32 error allowed on each stored logprob, ``eta(l)`` in nats."""
    return SLACK_ABS + SLACK_REL * np.abs(lp)


@dataclass
class TopkBounds:
    """Per-position bounds, each ``(T,)`` nats; NaN where a sampled token's logprob is missing."""

    kl_lb: np.ndarray
    js_lb: np.ndarray
    js_ub: np.ndarray


@dataclass
class _Position:
    """One position per column: the split of the listed tokens (see the module doc)."""

    p_s: np.ndarray  # (K+1, T) P's probabilities of S entries, 0 elsewhere
    q_s: np.ndarray
    lp_s: np.ndarray  # their logprobs, -inf elsewhere (for the slack)
    lq_s: np.ndarray
    p_a: np.ndarray  # (K+1, T) P's probabilities of A entries
    q_b: np.ndarray  # (K'+1, T) Q's probabilities of B entries
    cap_p: np.ndarray  # (T,), raised by the slack
    cap_q: np.ndarray
    p_rest: np.ndarray  # (T,) >= 0
    q_rest: np.ndarray
    eta_p: np.ndarray  # (K+1, T) the slack of each of P's entries (S and A), 0 where unlisted
    eta_q_s: np.ndarray  # of Q's logprobs of the S entries
    eta_q_b: np.ndarray  # (K'+1, T) of the B entries


def _slack_or_0(lp: np.ndarray) -> np.ndarray:
    return np.where(np.isfinite(lp), SLACK_ABS + SLACK_REL * np.abs(lp), 0.0)


def _cap(lps: np.ndarray, slacked: bool) -> np.ndarray:
    """Smallest listed probability of a top-k block ``(K, T)`` (1 where nothing is listed)."""
    listed = np.where(np.isfinite(lps), lps, np.inf).min(0, initial=np.inf)
    if slacked:
        listed = listed + np.where(np.isfinite(listed), slack(listed), 0.0)
    return np.where(np.isfinite(listed), np.minimum(np.exp(listed), 1.0), 1.0)


def split_positions(
    p_ids: np.ndarray, p_lps: np.ndarray, q_ids: np.ndarray, q_lps: np.ndarray, slacked: bool
) -> _Position:
    """The S / A / B split of :func:`positions_last` arrays ``(1 + K, T)`` (row 0 the sampled
    token, aligned on both sides)."""
    p_lps = np.asarray(p_lps, dtype=np.float64)
    q_lps = np.asarray(q_lps, dtype=np.float64)
    pi, qi = _dedupe(p_ids), _dedupe(q_ids)
    pi[pi < 0] = -2  # never equal to Q's -1
    eq = pi[:, None] == qi[None]  # (K+1, K'+1, T); after _dedupe at most one hit a row
    in_q, q_in_p = eq.any(1), eq.any(0)
    lp = np.where(pi >= 0, p_lps, -np.inf)
    lq_all = np.where(qi >= 0, q_lps, -np.inf)
    lq_of_p = np.take_along_axis(lq_all, eq.argmax(1), 0)
    lp_s = np.where(in_q, lp, -np.inf)
    lq_s = np.where(in_q, lq_of_p, -np.inf)
    p_all, q_all = np.exp(lp), np.exp(lq_all)  # -inf (not listed) gives 0
    p_s = np.where(in_q, p_all, 0.0)
    return _Position(
        eta_p=_slack_or_0(lp),
        eta_q_s=_slack_or_0(lq_s),
        eta_q_b=np.where(q_in_p, 0.0, _slack_or_0(lq_all)),
        p_s=p_s,
        q_s=np.exp(lq_s),
        lp_s=lp_s,
        lq_s=lq_s,
        p_a=p_all - p_s,
        q_b=np.where(q_in_p, 0.0, q_all),
        cap_p=_cap(p_lps[1:], slacked),
        cap_q=_cap(q_lps[1:], slacked),
        p_rest=np.maximum(1.0 - p_all.sum(0), 0.0),
        q_rest=np.maximum(1.0 - q_all.sum(0), 0.0),
    )


# ---------------------------------------------------------------------------- upper bound


def _g(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """``((p+q)/2) h(p/(p+q))`` in nats: what a known pair takes off ln 2."""
    s = p + q
    return -0.5 * (rel_entr(p, s) + rel_entr(q, s))


def js_upper(pos: _Position, slacked: bool) -> np.ndarray:
    """``ln 2 - sum_S g(p, q)``, at each logprob lowered by its slack when ``slacked``."""
    if slacked:
        p = np.exp(pos.lp_s - slack(pos.lp_s))
        q = np.exp(pos.lq_s - slack(pos.lq_s))
    else:
        p, q = pos.p_s, pos.q_s
    return np.clip(LN2 - _g(p, q).sum(0), 0.0, LN2)


# ---------------------------------------------------------------------------- lower bounds


def _js_term(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    m = 0.5 * (p + q)
    return 0.5 * (rel_entr(p, m) + rel_entr(q, m))


@dataclass(frozen=True)
class _Kind:
    """One divergence's pieces of the dual (see the module doc)."""

    name: str

    def term(self, p: np.ndarray, q: np.ndarray) -> np.ndarray:
        return _js_term(p, q) if self.name == "js" else rel_entr(p, q)

    def lam(self, r: np.ndarray) -> np.ndarray:
        """The multiplier of P's mass from ``r_P`` (of Q's mass from ``r_Q``: :meth:`mu`)."""
        return 0.5 * (np.log(2.0 * r) - np.log1p(r)) if self.name == "js" else 1.0 + np.log(r)

    def mu(self, r: np.ndarray) -> np.ndarray:
        return 0.5 * (np.log(2.0 * r) - np.log1p(r)) if self.name == "js" else -1.0 / r

    def dlam(self, r: np.ndarray) -> np.ndarray:
        """``d lam / d ln r_P``."""
        return 0.5 / (1.0 + r) if self.name == "js" else np.ones_like(r)

    def dmu(self, r: np.ndarray) -> np.ndarray:
        """``d mu / d ln r_Q``."""
        return 0.5 / (1.0 + r) if self.name == "js" else 1.0 / r

    def grad_p(self, p: np.ndarray, q: np.ndarray, lam: np.ndarray) -> np.ndarray:
        """``p * d/dp [d(p, q) - lam p]`` (the change per unit of P's logprob)."""
        with np.errstate(divide="ignore", invalid="ignore"):
            if self.name == "js":
                inner = 0.5 * (np.log(2.0 * p) - np.log(p + q)) - lam
            else:
                inner = np.log(p) - np.log(q) + 1.0 - lam
            return np.where(p > 0, p * inner, 0.0)

    def grad_q(self, p: np.ndarray, q: np.ndarray, mu: np.ndarray) -> np.ndarray:
        """``q * d/dq [d(p, q) - mu q]``."""
        with np.errstate(divide="ignore", invalid="ignore"):
            if self.name == "js":
                return np.where(q > 0, q * (0.5 * (np.log(2.0 * q) - np.log(p + q)) - mu), 0.0)
            # KL's dependence on Q's unknown mass is covered by raising it (capped_lower)
            return np.where(q > 0, -p, 0.0)


JS, KL = _Kind("js"), _Kind("kl")


def absorb_ratio(w: np.ndarray, cap: np.ndarray, target: np.ndarray) -> np.ndarray:
    """The ``r >= 0`` with ``sum_i min(w_i r, cap) = target`` per column, in closed form.

    Args:
        w: ``(n, T)`` non-negative weights (0 for unused entries).
        cap: ``(T,)`` per-entry cap.
        target: ``(T,)`` mass to absorb.

    Returns:
        ``(T,)``: 0 where ``target <= 0``, inf where the capped entries cannot absorb it.
    """
    ws = -np.sort(-w, axis=0)  # descending: the largest weights reach the cap first
    n = len(ws)
    tail = np.concatenate([np.cumsum(ws[::-1], 0)[::-1], np.zeros((1, ws.shape[1]))])
    j = np.arange(n + 1)[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        r = (target - j * cap) / tail  # r if exactly the j largest are capped
        thr = np.where(ws > 0, cap / ws, np.inf)
    lo = np.concatenate([np.zeros((1, ws.shape[1])), thr])
    hi = np.concatenate([thr, np.full((1, ws.shape[1]), np.inf)])
    ok = (tail > 0) & (r >= lo) & (r <= hi)
    first = np.argmax(ok, axis=0)
    out = np.where(ok.any(0), np.take_along_axis(r, first[None], 0)[0], np.inf)
    return np.where(target <= 0, 0.0, out)


@dataclass
class _Dual:
    value: np.ndarray
    lam: np.ndarray
    mu: np.ndarray
    q_a: np.ndarray
    p_b: np.ndarray


def _dual_at(
    kind: _Kind, pos: _Position, q_rest: np.ndarray, x: np.ndarray, y: np.ndarray
) -> _Dual:
    """``G`` at ``r_P = e^x``, ``r_Q = e^y`` (see the module doc)."""
    r_p, r_q = np.exp(x), np.exp(y)
    p_b = np.minimum(pos.q_b * r_p, pos.cap_p)
    q_a = np.minimum(pos.p_a * r_q, pos.cap_q)
    lam, mu = kind.lam(r_p), kind.mu(r_q)
    value = (
        kind.term(pos.p_s, pos.q_s).sum(0)
        + kind.term(pos.p_a, q_a).sum(0)
        + kind.term(p_b, pos.q_b).sum(0)
        + lam * (pos.p_rest - p_b.sum(0))
        + mu * (q_rest - q_a.sum(0))
    )
    return _Dual(value, lam, mu, q_a, p_b)


def _log_ratio(r: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return np.clip(np.log(r), -_LOG_R, _LOG_R)


def boundary_ratio(
    pos: _Position, q_rest: np.ndarray, lo: np.ndarray, hi: np.ndarray
) -> np.ndarray:
    """The maximum of ``G`` on the boundary ``r_Q = 1 / r_P``, as ``r_P`` in ``[lo, hi]``.

    For JS and KL alike, ``dG / d ln r_P`` there has the sign of
    ``h(r) = p_rest - sum_B min(q_b r, c_P) - r q_rest + sum_A min(p_a, c_Q r)``, which is
    piecewise linear in ``r`` (breakpoints ``c_P / q_b`` and ``p_a / c_Q``) and, between the
    two unconstrained maxima ``lo`` and ``hi``, decreasing (``G`` is concave along that arc):
    a binary search over the sorted breakpoints finds the segment where ``h`` changes sign and
    the root on it is exact.
    """
    with np.errstate(divide="ignore"):
        bp = np.concatenate(
            [
                np.where(pos.q_b > 0, pos.cap_p / pos.q_b, hi),
                np.where(pos.p_a > 0, pos.p_a / pos.cap_q, hi),
            ]
        )
    nodes = np.sort(np.clip(np.concatenate([lo[None], bp, hi[None]]), lo, hi), axis=0)

    def h(r: np.ndarray) -> np.ndarray:
        return (
            pos.p_rest
            - np.minimum(pos.q_b * r, pos.cap_p).sum(0)
            - r * q_rest
            + np.minimum(pos.p_a, pos.cap_q * r).sum(0)
        )

    cols = np.arange(nodes.shape[1])
    a, b = np.zeros(len(cols), dtype=np.int64), np.full(len(cols), len(nodes) - 1)
    while (b - a > 1).any():  # invariant: h(nodes[a]) >= 0 >= h(nodes[b]) (or the ends)
        m = (a + b) // 2
        pos_m = h(nodes[m, cols]) > 0
        a, b = np.where(pos_m & (b - a > 1), m, a), np.where(~pos_m & (b - a > 1), m, b)
    ra, rb = nodes[a, cols], nodes[b, cols]
    ha, hb = h(ra), h(rb)
    with np.errstate(divide="ignore", invalid="ignore"):
        r = ra + ha * (rb - ra) / (ha - hb)
    r = np.where((ha > 0) & (hb < 0), r, np.where(ha <= 0, ra, rb))
    return np.clip(r, lo, hi)


def p_ratio(pos: _Position) -> np.ndarray:
    """``ln r_P`` of P's unconstrained maximum (the same for JS and KL)."""
    return _log_ratio(absorb_ratio(pos.q_b, pos.cap_p, pos.p_rest))


def capped_lower(
    kind: _Kind, pos: _Position, slacked: bool, x0: np.ndarray | None = None
) -> np.ndarray:
    """The capped minimum of ``kind`` at every position (module doc), minus the slack;
    ``x0`` is :func:`p_ratio` when the caller has it."""
    q_rest = pos.q_rest
    if kind is KL:  # KL only falls as Q's unknown mass grows: raise it by its float32 error
        if slacked:
            q_rest = q_rest + _rounding_mass(pos)
        q_rest = np.maximum(q_rest, TAIL_FLOOR)
    x0 = p_ratio(pos) if x0 is None else x0
    y0 = _log_ratio(absorb_ratio(pos.p_a, pos.cap_q, q_rest))
    inside = x0 + y0 <= 0
    x, y = x0.copy(), y0.copy()
    out = np.flatnonzero(~inside)
    if len(out):  # the boundary search, on the columns that need it only
        mid = np.log(
            boundary_ratio(_columns(pos, out), q_rest[out], np.exp(-y0[out]), np.exp(x0[out]))
        )
        x[out], y[out] = mid, -mid
    with np.errstate(invalid="ignore", over="ignore"):
        d = _dual_at(kind, pos, q_rest, x, y)
    value = d.value
    if slacked:
        # an infinite KL (a listed token Q gives probability 0) stays infinite
        value = np.where(np.isinf(value), value, value - 2.0 * _sensitivity(kind, pos, d))
    top = LN2 if kind is JS else np.inf
    return np.clip(value, 0.0, top)


def _columns(pos: _Position, cols: np.ndarray) -> _Position:
    """The positions ``cols`` of ``pos``."""
    return _Position(**{k: v[..., cols] for k, v in vars(pos).items()})


def _rounding_mass(pos: _Position) -> np.ndarray:
    """How much Q's listed probabilities may overstate its listed mass (float32 error)."""
    return (pos.q_s * np.expm1(pos.eta_q_s)).sum(0) + (pos.q_b * np.expm1(pos.eta_q_b)).sum(0)


def _sensitivity(kind: _Kind, pos: _Position, d: _Dual) -> np.ndarray:
    """``sum_x eta_x |dG / d l_x|`` over the listed logprobs, at the dual's multipliers (caps
    are raised instead: a larger cap can only lower G)."""
    # S and A are P's entries, apart: one gradient array for both
    grad_p = kind.grad_p(pos.p_s + pos.p_a, pos.q_s + d.q_a, d.lam)
    out = (np.abs(grad_p) * pos.eta_p).sum(0)
    out += (np.abs(kind.grad_q(pos.p_s, pos.q_s, d.mu)) * pos.eta_q_s).sum(0)
    out += (np.abs(kind.grad_q(d.p_b, pos.q_b, d.mu)) * pos.eta_q_b).sum(0)
    return out


# ---------------------------------------------------------------------------- entry points


def repeated_strings(ids: np.ndarray) -> np.ndarray:
    """``(T,)``: whether a position's top-k list (rows 1: of ``(1 + K, T)`` ids) names one
    token string twice."""
    top = ids[1:]
    return ((top >= 0) & (_dedupe(top) < 0)).any(0)


def topk_bounds_columns(
    p_ids: np.ndarray,
    p_lps: np.ndarray,
    q_ids: np.ndarray,
    q_lps: np.ndarray,
    *,
    slacked: bool = True,
) -> TopkBounds:
    """Per-position KL lower, JS lower and JS upper bounds on :func:`positions_last` arrays.

    Args:
        p_ids, p_lps: P's sampled token then top-k, ``(1 + K, T)``.
        q_ids, q_lps: Q's logprob of the same sampled token then Q's top-k, ``(1 + K', T)``.
        slacked: Allow the documented float32 error on every logprob (module doc); False
            evaluates the bounds exactly on the given numbers (for float64 checks).
    """
    pos = split_positions(p_ids, p_lps, q_ids, q_lps, slacked)
    missing = np.isnan(np.asarray(p_lps[0], dtype=np.float64)) | np.isnan(
        np.asarray(q_lps[0], dtype=np.float64)
    )
    x0 = p_ratio(pos)
    kl_lb = capped_lower(KL, pos, slacked, x0)
    js_lb = capped_lower(JS, pos, slacked, x0)
    js_ub = js_upper(pos, slacked)
    trivial = repeated_strings(np.asarray(p_ids)) | repeated_strings(np.asarray(q_ids))
    nan = np.nan
    return TopkBounds(
        kl_lb=np.where(missing, nan, np.where(trivial, 0.0, kl_lb)),
        js_lb=np.where(missing, nan, np.where(trivial, 0.0, js_lb)),
        js_ub=np.where(missing, nan, np.where(trivial, LN2, js_ub)),
    )


def topk_bounds(p: TokenScores, q: TokenScores, *, slacked: bool = True) -> TopkBounds:
    """:func:`topk_bounds_columns` of one response: P's scores and Q's aligned cross-score."""
    return topk_bounds_columns(*positions_last([p]), *positions_last([q]), slacked=slacked)
