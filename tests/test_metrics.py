"""Each metric against an independent brute-force reference, plus invariants."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from conftest import GEMMA_JSON, PKL, columns, random_logprobs, synthetic_pair
from scipy.spatial.distance import jensenshannon
from scipy.special import rel_entr
from scipy.stats import entropy

from divscope.estimators.ranking import rank_prompts
from divscope.estimators.topk import LN2, TAIL_FLOOR, coarse_bounds, mc_kl_terms
from divscope.samples import load_pair
from divscope.samples.parse import Ctx, scores_from_columns
from divscope.samples.records import TokenVocab


def _scores(cols: dict, vocab: TokenVocab):
    return scores_from_columns(cols, Ctx("test"), vocab)


def _brute_coarse(x, lp_full, lq_full, k_p, k_q):
    """The coarse-grained bound at one position, written out with sets and scipy."""
    p, q = np.exp(lp_full), np.exp(lq_full)
    top_p = set(np.argsort(-lp_full)[:k_p].tolist())
    top_q = set(np.argsort(-lq_full)[:k_q].tolist())
    known = sorted(({x} | top_p) & ({x} | top_q))
    pc = [p[j] for j in known] + [1 - sum(p[j] for j in known)]
    qc = [q[j] for j in known] + [1 - sum(q[j] for j in known)]
    pc, qc = np.clip(pc, 0, 1), np.clip(qc, 0, 1)
    qc[-1] = max(qc[-1], TAIL_FLOOR)  # the documented floor on Q's tail (rounding, not mass)
    return entropy(pc, qc), jensenshannon(pc, qc) ** 2


@pytest.mark.parametrize("k_p,k_q", [(1, 1), (3, 5), (5, 5), (10, 2), (20, 20)])
def test_coarse_bounds_match_brute_force_and_bound_the_truth(k_p, k_q):
    rng = np.random.default_rng(k_p * 100 + k_q)
    t, v = 40, 20
    lp, lq = random_logprobs(rng, (t, v)), random_logprobs(rng, (t, v))
    x = np.array([rng.choice(v, p=np.exp(row)) for row in lp])
    vocab = TokenVocab()
    p = _scores(columns(x, lp, k_p), vocab)
    q = _scores(columns(x, lq, k_q), vocab)
    kl, js = coarse_bounds(p, q)
    for i in range(t):
        b_kl, b_js = _brute_coarse(x[i], lp[i], lq[i], k_p, k_q)
        assert kl[i] == pytest.approx(b_kl, rel=1e-9, abs=1e-12)
        assert js[i] == pytest.approx(b_js, rel=1e-9, abs=1e-12)
    true_kl = rel_entr(np.exp(lp), np.exp(lq)).sum(1)
    true_js = np.array(
        [jensenshannon(np.exp(a), np.exp(b)) ** 2 for a, b in zip(lp, lq, strict=True)]
    )
    assert (kl <= true_kl + 1e-12).all() and (js <= true_js + 1e-12).all()
    assert (kl >= 0).all() and (js >= 0).all() and (js <= LN2).all()
    if k_p == k_q == v:  # top-k covers the vocabulary: the bound is the exact value
        np.testing.assert_allclose(kl, true_kl, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(js, true_js, rtol=1e-9, atol=1e-12)


def test_coarse_bounds_of_identical_distributions_are_zero():
    rng = np.random.default_rng(1)
    lp = random_logprobs(rng, (30, 15))
    x = rng.integers(0, 15, 30)
    vocab = TokenVocab()
    kl, js = coarse_bounds(_scores(columns(x, lp, 5), vocab), _scores(columns(x, lp, 5), vocab))
    np.testing.assert_allclose(kl, 0, atol=1e-12)
    np.testing.assert_allclose(js, 0, atol=1e-12)


def test_coarse_tail_rounding_never_gives_inf():
    # Q's known mass rounds to 1 (tail 0) while P keeps a tail: the floor keeps it finite.
    vocab = TokenVocab()
    p = _scores(
        {
            "tokens": ["a"],
            "logprobs": [-0.1],
            "top_tokens": [["a", "b"]],
            "top_logprobs": [[-0.1, -3.0]],
        },
        vocab,
    )
    q = _scores(
        {"tokens": ["a"], "logprobs": [0.0], "top_tokens": [["a"]], "top_logprobs": [[0.0]]}, vocab
    )
    kl, js = coarse_bounds(p, q)
    assert np.isfinite(kl).all() and kl[0] > 0 and 0 < js[0] <= LN2


def test_mc_kl_terms_brute_force_and_unbiased():
    rng = np.random.default_rng(2)
    t, v, n = 6, 8, 4000
    lp, lq = random_logprobs(rng, (t, v), 1.0), random_logprobs(rng, (t, v), 1.0)
    vocab = TokenVocab()
    total, count, per_seq = 0.0, 0, []
    for _ in range(n):
        x = np.array([rng.choice(v, p=np.exp(row)) for row in lp])
        s, c = mc_kl_terms(
            _scores(columns(x, lp, 2), vocab), _scores(columns(x, lq, 2), vocab), True, 0
        )
        brute = sum(lp[i, x[i]] - lq[i, x[i]] for i in range(t))
        assert s == pytest.approx(brute, rel=1e-12) and c == t
        total, count = total + s, count + c
        per_seq.append(s / t)
    true_rate = rel_entr(np.exp(lp), np.exp(lq)).sum(1).mean()
    se = np.std(per_seq) / math.sqrt(n)
    assert abs(total / count - true_rate) < 4 * se


def test_mc_kl_missing_cross_logprob_is_not_scored_as_zero():
    vocab = TokenVocab()
    p = _scores({"tokens": ["a", "b"], "logprobs": [-0.5, -0.2]}, vocab)
    q = _scores({"tokens": ["a", "b"], "logprobs": [-1.0, None]}, vocab)
    s, c = mc_kl_terms(p, q, True, 2)
    assert c == 0 and math.isnan(s)


# ---------------------------------------------------------------- whole-file scores


def test_ranking_mc_kl_and_bounds_against_brute_force(tmp_path):
    fa, fb, truth = synthetic_pair(tmp_path, k=5)
    a, b = load_pair(fa, fb)
    r = rank_prompts(a, b, n_bootstrap=200)
    assert r.metric == "mc_kl"
    assert {"mc_kl", "topk_kl_lb", "topk_js_lb", "topk_js_ub", "legacy_aligned"} <= set(r.available)
    for i, ps in enumerate(r.prompts):
        for suffix, side in (("_ab", "A"), ("_ba", "B")):
            num = sum(
                own[np.arange(len(x)), x].sum() - oth[np.arange(len(x)), x].sum()
                for x, own, oth in truth[side][i]
            )
            den = sum(len(x) for x, _, _ in truth[side][i])
            assert ps.scores["mc_kl" + suffix] == pytest.approx(num / den, rel=1e-10)
            kl_sum = js_sum = 0.0
            for x, own, oth in truth[side][i]:
                for t in range(len(x)):
                    bk, bj = _brute_coarse(x[t], own[t], oth[t], 5, 5)
                    kl_sum, js_sum = kl_sum + bk, js_sum + bj
            # the capped bounds: at least the tail-bucket ones (up to the float32 slack) ...
            assert ps.scores["topk_kl_lb" + suffix] >= kl_sum / den - 1e-3
            assert ps.scores["topk_js_lb" + suffix] >= js_sum / den - 1e-4
            # ... and never above the full-vocabulary values on the same positions; the JS
            # upper bound never below
            full = (
                sum(rel_entr(np.exp(own), np.exp(oth)).sum() for _, own, oth in truth[side][i])
                / den
            )
            full_js = (
                sum(
                    (jensenshannon(np.exp(own), np.exp(oth), axis=1) ** 2).sum()
                    for _, own, oth in truth[side][i]
                )
                / den
            )
            assert ps.scores["topk_kl_lb" + suffix] <= full + 1e-12
            assert ps.scores["topk_js_lb" + suffix] <= full_js + 1e-12
            assert ps.scores["topk_js_ub" + suffix] >= full_js - 1e-12
        assert ps.scores["mc_kl"] == pytest.approx(
            0.5 * (ps.scores["mc_kl_ab"] + ps.scores["mc_kl_ba"])
        )
        lo, hi = ps.ci["mc_kl"]
        assert lo <= ps.scores["mc_kl"] <= hi


def test_identical_models_give_zero(tmp_path):
    fa, fb, _ = synthetic_pair(tmp_path, same=True)
    a, b = load_pair(fa, fb)
    r = rank_prompts(a, b, n_bootstrap=100)
    for ps in r.prompts:
        for m in ("mc_kl", "mc_kl_ab", "mc_kl_ba", "topk_kl_lb", "topk_js_lb"):
            assert ps.scores[m] == pytest.approx(0.0, abs=1e-12), m


def test_units_per_byte_when_tokenizers_differ(tmp_path):
    fa, fb, _ = synthetic_pair(tmp_path, n_prompts=1, n_resp=2)
    recs = [json.loads(line) for line in fa.read_text().splitlines()]
    for resp in recs[0]["responses"]:  # B tokenises A's text differently: one token per text
        c = resp["cross_scores"]["model-b"]
        resp["cross_scores"]["model-b"] = {
            "aligned": False,
            "tokens": [resp["text"]],
            "logprobs": [sum(c["logprobs"])],
        }
    fa.write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    a, b = load_pair(fa, fb)
    r = rank_prompts(a, b, n_bootstrap=50)
    assert r.units["mc_kl"] == "nats/byte"
    num = sum(
        sum(x["logprobs"]["logprobs"]) - x["cross_scores"]["model-b"]["logprobs"][0]
        for x in recs[0]["responses"]
    )
    den = sum(len(x["text"].encode()) for x in recs[0]["responses"])
    assert r.prompts[0].scores["mc_kl_ab"] == pytest.approx(num / den, rel=1e-10)
    assert "topk_kl_lb_ab" not in r.available  # no aligned positions, no bounds


def _legacy_brute(records_a, records_b):
    """The legacy heuristic, written as the old per-token dict walk."""

    def direction(c1, c2):
        total, n = 0.0, 0
        for d1, d2 in zip(c1, c2, strict=False):
            lq = (
                d2["logprob"]
                if d2["token"] == d1["token"]
                else next(
                    (
                        e["logprob"]
                        for e in d2.get("top_logprobs") or []
                        if e["token"] == d1["token"]
                    ),
                    None,
                )
            )
            if lq is None:
                continue
            p = math.exp(d1["logprob"])
            total += p * (d1["logprob"] - lq)
            n += 1
        return total / n if n else None

    out = []
    for ra, rb in zip(records_a, records_b, strict=True):
        ab, ba = [], []
        for x in ra["responses"]:
            for y in rb["responses"]:
                cx = x["choices"][0]["logprobs"]["content"]
                cy = y["choices"][0]["logprobs"]["content"]
                ab.append(direction(cx, cy))
                ba.append(direction(cy, cx))
        ab = [v for v in ab if v is not None]
        ba = [v for v in ba if v is not None]
        out.append((np.mean(ab), np.mean(ba), np.mean(ab + ba)))
    return out


def test_legacy_aligned_on_real_files_matches_the_dict_walk():
    from divscope.samples.safe_pickle import safe_load_pickle

    a, b = load_pair(PKL, GEMMA_JSON)
    r = rank_prompts(a, b, n_bootstrap=100)
    assert r.metric == "legacy_aligned" and "mc_kl" not in r.available
    assert any("no honest KL estimate" in n for n in r.notes)
    brute = _legacy_brute(safe_load_pickle(PKL), json.loads(GEMMA_JSON.read_text()))
    for ps, (ab, ba, mean) in zip(r.prompts, brute, strict=True):
        assert ps.scores["legacy_aligned_ab"] == pytest.approx(ab, rel=1e-10)
        assert ps.scores["legacy_aligned_ba"] == pytest.approx(ba, rel=1e-10)
        assert ps.scores["legacy_aligned"] == pytest.approx(mean, rel=1e-10)
        assert 0 < ps.coverage["matched_token_share"] < 1


def test_bootstrap_ci_none_with_one_response(tmp_path):
    fa, fb, _ = synthetic_pair(tmp_path, n_prompts=2, n_resp=1)
    a, b = load_pair(fa, fb)
    r = rank_prompts(a, b, n_bootstrap=50)
    assert all(ps.ci["mc_kl"] is None for ps in r.prompts)
    assert all(ps.scores["mc_kl"] is not None for ps in r.prompts)


def test_bootstrap_ci_narrows_with_more_samples(tmp_path):
    widths = []
    for n in (3, 30):
        d = tmp_path / str(n)
        d.mkdir()
        fa, fb, _ = synthetic_pair(d, n_prompts=1, n_resp=n, seed=5)
        a, b = load_pair(fa, fb)
        lo, hi = rank_prompts(a, b, n_bootstrap=500).prompts[0].ci["mc_kl"]
        widths.append(hi - lo)
    assert widths[1] < widths[0]


def test_spread_over_text_matches_a_brute_force_character_walk():
    from divscope.estimators.contributions import spread_over_text

    rng = np.random.default_rng(3)
    text = "the quick brown fox jumps over the lazy dog"
    for _ in range(20):
        cuts_a = sorted(set(rng.integers(1, len(text), 8).tolist()))
        cuts_b = sorted(set(rng.integers(1, len(text), 5).tolist()))
        a = [text[i:j] for i, j in zip([0, *cuts_a], [*cuts_a, len(text)], strict=True)]
        b = [text[i:j] for i, j in zip([0, *cuts_b], [*cuts_b, len(text)], strict=True)]
        lb = -rng.exponential(1.0, len(b))
        per_char = np.concatenate([[v / len(t)] * len(t) for t, v in zip(b, lb, strict=True)])
        starts = np.cumsum([0] + [len(t) for t in a])
        brute = [per_char[s:e].sum() for s, e in zip(starts[:-1], starts[1:], strict=True)]
        np.testing.assert_allclose(spread_over_text(a, b, lb), brute, atol=1e-12)
