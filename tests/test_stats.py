"""divscope.stats.analysis: the published analysis reproduced, and each statistic against a reference."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from scipy import stats as st

from divscope.cli import main
from divscope.stats import analysis as stats

REF = Path(__file__).parent / "data" / "reference_qwen7b"


@pytest.fixture(scope="module")
def reference():
    m = stats.load_matrices(REF / "divergence_matrices.json")
    cos = stats.load_cosine(REF / "cosine_11_l20.json") + stats.load_cosine(
        REF / "cosine_leakage_correlation.json"
    )
    leak = stats.load_leakage(REF)
    return m, cos, leak, stats.analyze(m, cos, leak, n_perm=999, n_boot=200)


def test_reproduces_the_published_numbers(reference):
    *_, r = reference
    published = json.loads((REF / "analysis_results.json").read_text())
    d = r["discrimination"]
    assert d["std"] == pytest.approx(0.0123, abs=5e-5) and d["ratio"] == pytest.approx(
        10.68, abs=5e-3
    )
    assert not d["pass_std"] and d["pass_ratio"] and not d["pass"]  # the std gate fails
    for k in ("mean", "std", "min", "max", "ratio"):
        assert d[k] == pytest.approx(published["discrimination"][f"js_{k}"], rel=1e-9)
    lk = r["leakage"]
    assert lk["n_pairs"] == 50
    assert lk["js_spearman_rho"] == pytest.approx(-0.746, abs=5e-4)
    assert lk["js_spearman_p"] == pytest.approx(5.24e-10, rel=0.01)
    assert lk["cosine"]["centred/layer_20"]["spearman_rho"] == pytest.approx(0.567, abs=5e-4)
    assert r["redundancy"]["centred/layer_20"]["spearman_rho"] == pytest.approx(-0.735, abs=5e-4)
    pub_pairs = {
        (p["source"], p["target"]): p for p in published["leakage_comparison"]["directed_pairs"]
    }
    for p in lk["directed_pairs"]:
        ref = pub_pairs[(p["source"], p["target"])]
        assert p["leakage_rate"] == ref["leakage_rate"] and p["js"] == pytest.approx(
            ref["js_value"]
        )
    assert r["kl_asymmetry"]["absolute"]["spearman_rho"] == pytest.approx(
        published["kl_asymmetry"]["spearman_rho"], rel=1e-9
    )
    pq = published["per_question"]["questions"]
    ours = r["per_question"]["questions"]
    for i, q in enumerate(pq):
        assert ours[f"q{i:02d}"]["js_mean"] == pytest.approx(q["js_mean"], rel=1e-9)
        assert ours[f"q{i:02d}"]["n_values"] == q["n_values"]


def test_reports_what_the_publication_did_not(reference):
    *_, r = reference
    cmp = r["leakage"]["cosine"]["centred/layer_20"]["comparison"]
    assert "Meng-Rosenthal-Rubin" in cmp["method"] and 0 < cmp["p"] < 1
    assert set(cmp["difference_ci"]) == {"pairs", "by_source"}
    assert 0 < r["redundancy"]["centred/layer_20"]["mantel_p"] <= 0.01
    within = r["leakage"]["within_source"]
    assert within["js"]["comedian"] is None  # no leakage from the comedian: rho undefined
    assert {f"raw111/layer_{k}" for k in (10, 15, 20, 25)} <= set(r["leakage"]["cosine"])


def _williams_brute(r12, r13, r23, n):
    """Steiger (1980) eq. 7 written with the correlation matrix's determinant."""
    R = np.array([[1, r12, r13], [r12, 1, r23], [r13, r23, 1]])
    det = np.linalg.det(R)
    rbar = (r12 + r13) / 2
    t = (r12 - r13) * math.sqrt(
        (n - 1) * (1 + r23) / (2 * ((n - 1) / (n - 3)) * det + rbar**2 * (1 - r23) ** 3)
    )
    return t, 2 * st.t.sf(abs(t), n - 3)


def test_dependent_correlation_tests():
    for r12, r13, r23, n in ((0.6, 0.3, 0.4, 50), (0.75, 0.57, 0.64, 50), (-0.2, 0.1, 0.5, 30)):
        out = stats.dependent_correlations(r12, r13, r23, n)
        t, p = _williams_brute(r12, r13, r23, n)
        assert out["williams_steiger"]["t"] == pytest.approx(t, rel=1e-12)
        assert out["williams_steiger"]["p"] == pytest.approx(p, rel=1e-9)
        # MRR and Williams agree closely at these n
        assert out["meng_rosenthal_rubin"]["p"] == pytest.approx(p, abs=0.03)
    same = stats.dependent_correlations(0.5, 0.5, 0.3, 40)
    assert same["meng_rosenthal_rubin"]["z"] == 0 and same["williams_steiger"]["p"] == 1


def test_dependent_correlation_test_has_its_nominal_size():
    # Under H0 (rho12 = rho13) the test rejects about 5% of the time.
    rng = np.random.default_rng(0)
    cov = np.array([[1, 0.5, 0.5], [0.5, 1, 0.4], [0.5, 0.4, 1]])
    n, rejections, sims = 60, 0, 600
    for _ in range(sims):
        x = rng.multivariate_normal(np.zeros(3), cov, n)
        c = np.corrcoef(x.T)
        p = stats.dependent_correlations(c[0, 1], c[0, 2], c[1, 2], n)["meng_rosenthal_rubin"]["p"]
        rejections += p < 0.05
    assert 0.025 < rejections / sims < 0.08


def test_mantel_against_a_brute_force_loop():
    rng = np.random.default_rng(1)
    n = 8
    a = rng.random((n, n))
    a = a + a.T
    b = a + rng.normal(scale=0.5, size=(n, n))
    b = b + b.T
    out = stats.mantel(a, b, n_perm=499, seed=3)
    iu = np.triu_indices(n, 1)
    obs = st.spearmanr(a[iu], b[iu]).statistic
    perms = np.argsort(np.random.default_rng(3).random((499, n)), axis=1)
    count = sum(
        abs(st.spearmanr(a[iu], b[np.ix_(p, p)][iu]).statistic) >= abs(obs) - 1e-12 for p in perms
    )
    assert out["rho"] == pytest.approx(obs, rel=1e-12)
    assert out["p"] == pytest.approx((1 + count) / 500)


def test_discrimination_uses_population_std():
    js = np.array([[0, 0.01, 0.02], [0.01, 0, 0.04], [0.02, 0.04, 0]])
    d = stats.discrimination(js, 0.005, 3.0)
    v = np.array([0.01, 0.02, 0.04])
    assert d["std"] == pytest.approx(math.sqrt(((v - v.mean()) ** 2).mean()))
    assert d["ratio"] == pytest.approx(4.0) and d["pass"]


def test_leakage_csv_and_errors(tmp_path):
    p = tmp_path / "leak.csv"
    p.write_text("source,target,rate,found,total\na,b,0.5,5,10\nb,a,0.1,1,10\na,a,0.9,9,10\n")
    leak = stats.load_leakage(p)
    assert leak == {
        ("a", "b"): {"rate": 0.5, "found": 5, "total": 10},
        ("b", "a"): {"rate": 0.1, "found": 1, "total": 10},
    }
    (tmp_path / "bad.csv").write_text("src,tgt\nx,y\n")
    with pytest.raises(stats.AnalysisInputError, match="missing columns"):
        stats.load_leakage(tmp_path / "bad.csv")
    (tmp_path / "m.json").write_text(json.dumps({"personas": ["a", "b"], "js": [[0, 1]]}))
    with pytest.raises(stats.AnalysisInputError, match="shape"):
        stats.load_matrices(tmp_path / "m.json")


def test_cli_analyze(tmp_path, capsys):
    out = tmp_path / "a.json"
    rc = main(
        [
            "analyze",
            "--matrices",
            str(REF / "divergence_matrices.json"),
            "--cosine",
            str(REF / "cosine_11_l20.json"),
            "--leakage",
            str(REF),
            "--json",
            str(out),
            "--figures",
            str(tmp_path / "figs"),
            "--n-permutations",
            "199",
            "--n-bootstrap",
            "100",
        ]
    )
    assert rc == 0
    doc = json.loads(out.read_text())
    assert set(doc["discrimination"]) >= {
        "mean",
        "std",
        "min",
        "max",
        "ratio",
        "thresholds",
        "pass",
    }
    red = doc["redundancy"]["centred/layer_20"]
    assert set(red) >= {
        "spearman_rho",
        "spearman_p",
        "pearson_r",
        "pearson_p",
        "mantel_p",
        "redundant",
    }
    lk = doc["leakage"]
    assert set(lk) >= {"n_pairs", "js_spearman_rho", "js_spearman_p", "cosine", "within_source"}
    assert set(lk["cosine"]["centred/layer_20"]["comparison"]) >= {"method", "statistic", "p"}
    assert "kl_asymmetry" in doc and "per_question" in doc
    figs = {p.name for p in (tmp_path / "figs").iterdir()}
    assert {
        "js.png",
        "kl.png",
        "kl_asymmetry_vs_leakage.png",
        "leakage_js_vs_centred_layer_20.png",
        "js_vs_cosine_centred_layer_20.png",
    } <= figs
    assert main(["analyze", "--matrices", str(tmp_path / "nope.json")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_analyze_never_overwrites_figures_silently(tmp_path, capsys):
    """An existing figure or JSON is checked before anything is computed or written."""
    figs = tmp_path / "figs"
    figs.mkdir()
    (figs / "js.png").write_bytes(b"mine")
    args = ["analyze", "--matrices", str(REF / "divergence_matrices.json"), "--figures", str(figs)]
    args += ["--n-permutations", "99", "--n-bootstrap", "50"]
    assert main(args) == 2
    assert "already holds figures" in capsys.readouterr().err
    assert (figs / "js.png").read_bytes() == b"mine"
    (tmp_path / "a.json").write_text("{}")
    assert main([*args[:3], "--json", str(tmp_path / "a.json")]) == 2
    assert (tmp_path / "a.json").read_text() == "{}"
    assert main([*args, "--overwrite"]) == 0
    assert (figs / "js.png").read_bytes() != b"mine"


def _subset(m: stats.PersonaMatrices, k: int) -> stats.PersonaMatrices:
    return stats.PersonaMatrices(m.names[:k], m.js[:k, :k], m.kl[:k, :k], source=m.source)


def test_small_samples_are_flagged_and_the_mantel_floor_is_real(reference):
    """3 personas: a warning that says why (3! orderings bound Mantel p away from 0); the bound
    holds on random matrices; 11 personas: no warning."""
    m = stats.load_matrices(REF / "divergence_matrices.json")
    cos = stats.load_cosine(REF / "cosine_11_l20.json")
    small = stats.analyze(_subset(m, 3), cos, n_perm=199)
    assert len(small["warnings"]) == 1 and "only 3 personas (3 pairs)" in small["warnings"][0]
    assert "below about 0.167" in small["warnings"][0]
    assert stats.analyze(m, cos, n_perm=99)["warnings"] == []
    rng = np.random.default_rng(1)
    for _ in range(20):
        a, b = rng.random((3, 3)), rng.random((3, 3))
        p = stats.mantel(a + a.T, b + b.T, n_perm=999, seed=int(rng.integers(1 << 30)))["p"]
        assert p >= 1 / math.factorial(3) - 0.04


def test_every_verdict_is_explained(reference, capsys):
    from divscope.report.tables import VERDICT_NOTES, analysis_summary

    m = stats.load_matrices(REF / "divergence_matrices.json")
    cos = stats.load_cosine(REF / "cosine_11_l20.json")
    res = stats.analyze(_subset(m, 3), cos, stats.load_leakage(REF), n_perm=99, n_boot=20)
    lines = [str(x) for x in analysis_summary(res)]
    text = "\n".join(lines)
    gate = next(i for i, ln in enumerate(lines) if ln.startswith("discrimination gate"))
    assert lines[gate + 1] == VERDICT_NOTES["discrimination"]
    assert lines[gate + 2].startswith("  PASS" if res["discrimination"]["pass"] else "  FAIL")
    assert "redundant: |rho| > 0.8" in text and "Mantel p: how often permuting" in text
    assert "Meng-Rosenthal-Rubin" in text and text.count("warning: only") >= 1
    assert main(["analyze", "--matrices", str(REF / "divergence_matrices.json"), "--cosine",
                 str(REF / "cosine_11_l20.json"), "--n-permutations", "99"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert VERDICT_NOTES["discrimination"] in out and "what it tests" in out
    assert "warning:" not in out  # 11 personas
