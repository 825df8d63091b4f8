"""Certified top-k bounds (:mod:`divscope.estimators.bounds`): the JS upper bound and the
capped lower bounds against exact full-vocabulary values on many synthetic distributions, the
upper bound's attainment, the lower bound against an independent scipy minimiser, and real
API files."""

from __future__ import annotations

import math

import numpy as np
import pytest
from conftest import GEMMA_JSON, PKL
from scipy.optimize import minimize
from scipy.special import rel_entr

from divscope.estimators.bounds import topk_bounds, topk_bounds_columns
from divscope.estimators.topk import coarse_bounds_columns
from divscope.samples import load_pair

LN2 = math.log(2.0)


def exact(lp: np.ndarray, lq: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Full-vocabulary KL(P||Q) and JS per row, float64."""
    p, q = np.exp(lp), np.exp(lq)
    m = 0.5 * (p + q)
    return rel_entr(p, q).sum(-1), 0.5 * (rel_entr(p, m) + rel_entr(q, m)).sum(-1)


def observe(lp: np.ndarray, lq: np.ndarray, x: np.ndarray, k: int):
    """What an API shows of rows ``(T, V)`` of P and Q: the sampled token ``x`` with both
    logprobs, then each side's top-k, as positions-last ``(1 + k, T)`` arrays."""
    t = np.arange(len(x))
    out = []
    for lx in (lp, lq):
        top = np.argsort(-lx, axis=1, kind="stable")[:, :k]
        ids = np.concatenate([x[None], top.T])
        lps = np.concatenate([lx[t, x][None], np.take_along_axis(lx, top, 1).T])
        out += [ids, lps]
    return out


def _norm(logits: np.ndarray) -> np.ndarray:
    return logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)


def _log(p: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return np.log(p)


def squeezed_tails(rng: np.random.Generator, t: int, v: int, k: int, overlap: bool):
    """Adversarial tails: each side's top-k, then its remaining mass on as few tokens as the
    cap allows (each at exactly its smallest listed probability, the last one below), the
    two tails on the same tokens (``overlap``) or on disjoint ones."""
    out = []
    for side in range(2):
        head = np.sort(rng.dirichlet(np.full(k + 1, 0.7), size=t), axis=1)[:, ::-1]
        known, rest = head[:, :k], head[:, k:].sum(1)
        known = known * rng.uniform(0.3, 1.0, (t, 1))  # leave more for the tail
        rest = 1.0 - known.sum(1)
        cap = known[:, -1]
        p = np.zeros((t, v))
        perm = np.argsort(rng.random((t, v)), axis=1)
        p[np.arange(t)[:, None], perm[:, :k]] = known
        n_full = np.floor(rest / cap).astype(int)
        tail_start = k if overlap or side == 0 else v // 2
        for i in range(t):
            slots = perm[i, tail_start : tail_start + n_full[i] + 1]
            if len(slots) <= n_full[i]:  # no room: spread the rest evenly
                slots = perm[i, k:]
                p[i, slots] += rest[i] / len(slots)
                continue
            p[i, slots[:-1]] = cap[i]
            p[i, slots[-1]] += rest[i] - cap[i] * n_full[i]
        out.append(_log(p / p.sum(1, keepdims=True)))
    return out


def families(rng: np.random.Generator, t: int):
    """(name, lp, lq, k) cases: Dirichlet, Zipf, perturbed copies, a vocabulary listed in
    full, squeezed tails."""
    for alpha, v, k in ((0.1, 64, 5), (0.5, 64, 1), (1.0, 200, 20), (0.05, 1000, 5)):
        p = rng.dirichlet(np.full(v, alpha), size=t)
        q = rng.dirichlet(np.full(v, alpha), size=t)
        yield f"dirichlet{alpha}", _log(p), _log(q), k
    for s, v, k in ((1.1, 500, 5), (2.0, 100, 3)):
        ranks = np.arange(1, v + 1) ** -s
        lp = _log(ranks[np.argsort(rng.random((t, v)), 1)])
        lq = _log(ranks[np.argsort(rng.random((t, v)), 1)])
        yield f"zipf{s}", _norm(lp), _norm(lq), k
    for eps, v, k in ((1e-3, 100, 5), (0.3, 100, 5), (2.0, 50, 20)):
        lp = _norm(rng.normal(scale=3.0, size=(t, v)))
        yield f"perturbed{eps}", lp, _norm(lp + rng.normal(scale=eps, size=(t, v))), k
    lp = _norm(rng.normal(scale=3.0, size=(t, 6)))  # everything listed: bounds = exact
    yield "all_listed", lp, _norm(lp + rng.normal(scale=0.5, size=(t, 6))), 6
    for overlap in (True, False):
        lp, lq = squeezed_tails(rng, t, 200, 5, overlap)
        yield f"squeezed{'_overlap' if overlap else '_disjoint'}", lp, lq, 5


def sample_tokens(rng: np.random.Generator, lp: np.ndarray) -> np.ndarray:
    u = rng.random(len(lp))[:, None]
    return np.minimum((np.cumsum(np.exp(lp), 1) < u).sum(1), lp.shape[1] - 1)


def test_bounds_hold_on_50000_synthetic_positions_float64():
    rng = np.random.default_rng(0)
    n = 0
    for name, lp, lq, k in families(rng, 5000):
        x = sample_tokens(rng, lp)
        obs = observe(lp, lq, x, k)
        b = topk_bounds_columns(*obs, slacked=False)
        kl, js = exact(lp, lq)
        assert (b.js_ub >= js - 1e-12).all(), (name, (js - b.js_ub).max())
        assert (b.js_lb <= js + 1e-12).all(), (name, (b.js_lb - js).max())
        assert (b.kl_lb <= kl + 1e-12 * (1 + kl)).all(), (name, (b.kl_lb - kl).max())
        assert (
            (b.js_lb <= b.js_ub + 1e-12).all() and (b.js_ub <= LN2).all() and (b.js_lb >= 0).all()
        )
        # the caps only add constraints: never below the tail-bucket bound
        kl_c, js_c = coarse_bounds_columns(*obs)
        assert (b.js_lb >= js_c - 1e-12).all()
        assert ((b.kl_lb >= kl_c) | np.isclose(b.kl_lb, kl_c, rtol=1e-9, atol=1e-12)).all()
        n += len(x)
    assert n >= 50_000


def test_bounds_hold_in_float32_with_the_documented_slack():
    """Logprobs stored as float32 (rounded), and logprobs from a float32 log-softmax (listed
    probabilities can sum past 1): the slacked bounds never cross the float64 values."""
    rng = np.random.default_rng(1)
    n = over_one = 0
    for name, lp, lq, k in families(rng, 5000):
        x = sample_tokens(rng, lp)
        kl, js = exact(lp, lq)
        for how in ("stored", "computed"):
            if how == "stored":
                lp32, lq32 = lp.astype(np.float32), lq.astype(np.float32)
            else:  # a float32 log-softmax of large logits, shifted as a model's would be
                shift = rng.uniform(-30, 30, (len(x), 1))
                lp32, lq32 = (
                    torch_free_log_softmax32(np.maximum(lx, -80) + shift) for lx in (lp, lq)
                )
            obs = observe(lp32, lq32, x, k)
            over_one += int((np.exp(obs[1][1:].astype(np.float64)).sum(0) > 1).sum())
            b = topk_bounds_columns(*obs)
            js = np.minimum(js, LN2)  # float64 rounding of the reference, not of the bound
            assert (b.js_ub >= js).all(), (name, how, (js - b.js_ub).max())
            assert (b.js_lb <= js).all(), (name, how, (b.js_lb - js).max())
            assert (b.kl_lb <= kl).all(), (name, how, (b.kl_lb - kl).max())
            n += len(x)
    assert n >= 100_000 and over_one > 100  # the case the slack exists for does occur


def torch_free_log_softmax32(z: np.ndarray) -> np.ndarray:
    """log-softmax of float64 logits computed the way a float32 kernel does."""
    z32 = z.astype(np.float32)
    m = z32.max(1, keepdims=True)
    lse = m + np.log(np.exp(z32 - m).sum(1, keepdims=True, dtype=np.float32))
    with np.errstate(invalid="ignore"):
        return np.where(np.isfinite(z), z32 - lse, -np.inf).astype(np.float32)


def test_slack_costs_little():
    rng = np.random.default_rng(2)
    lp = _norm(rng.normal(scale=3.0, size=(2000, 100)))
    lq = _norm(lp + rng.normal(scale=0.5, size=lp.shape))
    obs = observe(lp, lq, sample_tokens(rng, lp), 5)
    tight, loose = topk_bounds_columns(*obs, slacked=False), topk_bounds_columns(*obs)
    assert 0 <= (loose.js_ub - tight.js_ub).max() < 2e-5
    assert 0 <= (tight.js_lb - loose.js_lb).max() < 1e-3
    assert 0 <= (tight.kl_lb - loose.kl_lb).max() < 1e-2


# ------------------------------------------------------------------ attainment and optimality


def _split(lp, lq, x, k):
    """S, A, B, caps and unlisted masses of one position, from sets (independent of the
    module's array code)."""
    p, q = np.exp(lp), np.exp(lq)
    top_p = list(np.argsort(-lp, kind="stable")[:k])
    top_q = list(np.argsort(-lq, kind="stable")[:k])
    s = sorted(({x} | set(top_p)) & ({x} | set(top_q)))
    a = [j for j in top_p if j not in s]
    b = [j for j in top_q if j not in s]
    return dict(
        s=s, a=a, b=b, p=p, q=q,
        cap_p=p[top_p].min(), cap_q=q[top_q].min(),
        p_rest=1 - p[s].sum() - p[a].sum(), q_rest=1 - q[s].sum() - q[b].sum(),
    )  # fmt: skip


def _js(p, q):
    m = 0.5 * (p + q)
    return 0.5 * (rel_entr(p, m) + rel_entr(q, m)).sum()


def test_upper_bound_is_attained_by_a_disjoint_filling_in():
    """Build a full pair consistent with what the API shows -- A's tokens get q = 0, B's
    p = 0, the unlisted masses go to fresh tokens of one side each, every one within its cap --
    and its exact JS equals the upper bound."""
    rng = np.random.default_rng(3)
    for trial in range(200):
        v, k = int(rng.integers(5, 40)), int(rng.integers(1, 6))
        lp = _norm(rng.normal(scale=2.5, size=v))
        lq = _norm(rng.normal(scale=2.5, size=v))
        x = int(rng.choice(v, p=np.exp(lp)))
        d = _split(lp, lq, x, k)
        p_new, q_new = [d["p"][j] for j in d["s"]], [d["q"][j] for j in d["s"]]
        p_new += [d["p"][j] for j in d["a"]] + [0.0] * len(d["b"])
        q_new += [0.0] * len(d["a"]) + [d["q"][j] for j in d["b"]]
        for own, cap, rest in ((p_new, d["cap_p"], d["p_rest"]), (q_new, d["cap_q"], d["q_rest"])):
            rest = max(rest, 0.0)
            n_full = int(rest // cap)
            fill = [cap] * n_full + [rest - cap * n_full]
            other = q_new if own is p_new else p_new
            own += fill
            other += [0.0] * len(fill)
        p_new, q_new = np.array(p_new), np.array(q_new)
        assert p_new.sum() == pytest.approx(1, abs=1e-12) and q_new.sum() == pytest.approx(1)
        ub = topk_bounds_columns(*observe(lp[None], lq[None], np.array([x]), k), slacked=False)
        assert ub.js_ub[0] == pytest.approx(_js(p_new, q_new), abs=1e-12), trial
        assert ub.js_ub[0] >= _js(np.exp(lp), np.exp(lq)) - 1e-12


def _scipy_minimum(d: dict, kind: str) -> float:
    """The capped minimum written as a constrained problem for scipy's SLSQP: variables Q's
    probabilities of A's tokens, P's of B's tokens, and the unlisted rest (P_R, Q_R)."""
    ps, qs = d["p"][d["s"]], d["q"][d["s"]]
    pa, qb = d["p"][d["a"]], d["q"][d["b"]]
    na, nb = len(pa), len(qb)
    q_rest = max(d["q_rest"], 1e-12) if kind == "kl" else max(d["q_rest"], 0.0)
    p_rest = max(d["p_rest"], 0.0)

    def div(p, q):
        p, q = np.maximum(p, 0), np.maximum(q, 0)
        if kind == "kl":
            return rel_entr(p, q).sum()
        return _js(p, q)

    def objective(z):
        qa, pb, pr, qr = z[:na], z[na : na + nb], z[-2], z[-1]
        return div(np.r_[ps, pa, pb, pr], np.r_[qs, qa, qb, qr])

    cons = [
        {"type": "eq", "fun": lambda z: z[na : na + nb].sum() + z[-2] - p_rest},
        {"type": "eq", "fun": lambda z: z[:na].sum() + z[-1] - q_rest},
    ]
    bounds = [(1e-300, d["cap_q"])] * na + [(0, d["cap_p"])] * nb + [(0, 1), (1e-300, 1)]
    best = np.inf
    rng = np.random.default_rng(0)
    for _start in range(6):
        w = rng.random(na + nb + 2) + 0.1
        z0 = np.r_[
            np.minimum(w[:na] / (w[:na].sum() + w[-1]) * q_rest, d["cap_q"]),
            np.minimum(w[na : na + nb] / (w[na : na + nb].sum() + w[-2]) * p_rest, d["cap_p"]),
            0.0, 0.0,
        ]  # fmt: skip
        z0[-2] = p_rest - z0[na : na + nb].sum()
        z0[-1] = q_rest - z0[:na].sum()
        r = minimize(objective, z0, method="SLSQP", bounds=bounds, constraints=cons,
                     options={"ftol": 1e-15, "maxiter": 2000})  # fmt: skip
        best = min(best, objective(_project(r.x, na, nb, d, p_rest, q_rest)))
    return best


def _project(z, na, nb, d, p_rest, q_rest):
    """SLSQP's answer moved onto the feasible set (its constraints hold to ~1e-10 only), so
    that its value is that of a real completion: never below the true minimum."""
    z = z.copy()
    qa, pb = np.clip(z[:na], 0, d["cap_q"]), np.clip(z[na : na + nb], 0, d["cap_p"])
    qa *= min(1.0, q_rest / qa.sum()) if qa.sum() > 0 else 1.0
    pb *= min(1.0, p_rest / pb.sum()) if pb.sum() > 0 else 1.0
    z[:na], z[na : na + nb] = qa, pb
    z[-2], z[-1] = max(p_rest - pb.sum(), 0.0), max(q_rest - qa.sum(), 0.0)
    return z


@pytest.mark.parametrize("kind", ["js", "kl"])
def test_capped_lower_bound_equals_an_independent_constrained_minimiser(kind):
    rng = np.random.default_rng(4 if kind == "js" else 5)
    checked = 0
    for trial in range(60):
        v, k = int(rng.integers(6, 14)), int(rng.integers(2, 5))
        lp = _norm(rng.normal(scale=2.0, size=v))
        lq = _norm(rng.normal(scale=2.0, size=v) + (lp if trial % 2 else 0))
        x = int(rng.choice(v, p=np.exp(lp)))
        d = _split(lp, lq, x, k)
        got = topk_bounds_columns(*observe(lp[None], lq[None], np.array([x]), k), slacked=False)
        lb = got.js_lb[0] if kind == "js" else got.kl_lb[0]
        ref = _scipy_minimum(d, kind)
        assert lb <= ref + 1e-12 * (1 + ref), (trial, lb, ref)  # never above a feasible value
        assert ref - lb <= 1e-8, (trial, lb, ref)
        checked += 1
    assert checked == 60


# ------------------------------------------------------------------ real API files


def test_real_openrouter_top5_lists_evaluate_without_violations():
    """The real top-5 files carry no cross-scores: P is position t of a gemma response, Q's
    lists are position t of a cloud response, and Q's logprob of P's sampled token is the
    listed one where it is on Q's list, else one below Q's smallest (a consistent value).
    Real float32-rounded lists, some summing past 1: the bounds are finite and ordered."""
    a, b = load_pair(GEMMA_JSON, PKL)
    checked = over_one = informative = 0
    for ra, rb in zip(a.records, b.records, strict=True):
        for x, y in zip(ra.usable, rb.usable, strict=False):
            p, q = x.scores, y.scores
            t = min(len(p), len(q))
            hit = q.top_ids[:t] == p.ids[:t, None]
            keep = np.arange(t)
            q_lp = np.where(
                hit.any(1),
                np.where(hit, q.top_logprobs[:t], 0.0).sum(1),
                q.top_logprobs[:t].min(1) - 1.0,
            )
            p_ids = np.concatenate([p.ids[keep][None], p.top_ids[keep].T])
            p_lps = np.concatenate([p.logprobs[keep][None], p.top_logprobs[keep].T])
            q_ids = np.concatenate([p.ids[keep][None], q.top_ids[keep].T])
            q_lps = np.concatenate([q_lp[None], q.top_logprobs[keep].T])
            bd = topk_bounds_columns(p_ids, p_lps, q_ids, q_lps)
            over_one += int((np.exp(p_lps[1:]).sum(0) > 1).sum())
            informative += int((bd.js_ub < LN2 - 1e-9).sum())
            assert np.isfinite(bd.js_ub).all() and np.isfinite(bd.js_lb).all()
            assert np.isfinite(bd.kl_lb).all()
            assert (bd.js_lb >= 0).all() and (bd.js_lb <= bd.js_ub).all()
            assert (bd.js_ub <= LN2).all() and (bd.kl_lb >= 0).all()
            checked += len(keep)
    assert checked > 500 and over_one > 0, (checked, over_one)
    assert informative > 0.9 * checked  # few positions repeat a string on a list
    assert p.top_ids.shape[1] == 5


def test_a_repeated_string_gets_the_trivial_interval():
    """Two token ids that decode alike: Q's list names "b" twice, so its pairs are not single
    tokens' (the second "b" could hold more than the cap allows an unlisted token)."""
    ids_p = np.array([[0], [0], [1]])
    lps_p = np.log(np.array([[0.5], [0.5], [0.3]]))
    ids_q = np.array([[0], [1], [1]])  # "b" twice on Q's list
    lps_q = np.log(np.array([[0.2], [0.4], [0.3]]))
    b = topk_bounds_columns(ids_p, lps_p, ids_q, lps_q)
    assert b.js_lb[0] == 0 and b.js_ub[0] == pytest.approx(LN2) and b.kl_lb[0] == 0
    ok = topk_bounds_columns(ids_p, lps_p, np.array([[0], [1], [2]]), lps_q)
    assert ok.js_lb[0] > 0 and ok.js_ub[0] < LN2  # the same lists with distinct strings


def test_topk_bounds_of_one_response_match_the_columns():
    rng = np.random.default_rng(6)
    lp, lq = _norm(rng.normal(size=(7, 12))), _norm(rng.normal(size=(7, 12)))
    x = sample_tokens(rng, lp)
    from conftest import columns

    from divscope.samples.parse import Ctx, scores_from_columns
    from divscope.samples.records import TokenVocab

    vocab = TokenVocab()
    p = scores_from_columns(columns(x, lp, 3), Ctx("t"), vocab)
    q = scores_from_columns(columns(x, lq, 3), Ctx("t"), vocab)
    one = topk_bounds(p, q, slacked=False)
    _, js = exact(lp, lq)
    assert (one.js_lb <= js + 1e-12).all() and (one.js_ub >= js - 1e-12).all()
    assert one.js_ub.shape == (7,)
