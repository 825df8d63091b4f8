"""The demos' tables: one number format, compact text that fits, full HTML."""

from __future__ import annotations

import math

import numpy as np
import pytest

from divscope.report.tables import Table, checks_table, fmt, fmt_ci, ranking_table


@pytest.mark.parametrize(
    "value, text",
    [
        (0.5850796638421836, "0.5851"),
        (0.6931471805599453, "0.6931"),
        (0.5, "0.5000"),
        (-1.0, "-1.000"),
        (5.0762075098909065e-09, "5.076e-09"),
        (12.3456, "12.35"),
        (10402.0, "10402"),
        (np.float32(0.25), "0.2500"),
        (72, "72"),
        (np.int64(3), "3"),
        (0.0, "0"),
        (None, "-"),
        (True, "yes"),
        (np.bool_(False), "no"),
        (float("nan"), "nan"),
        ([2, 198], "[2, 198]"),
    ],
)
def test_fmt_four_significant_digits(value, text):
    assert fmt(value) == text


def test_fmt_round_trips_to_four_significant_digits():
    rng = np.random.default_rng(0)
    for x in rng.lognormal(0, 4, 200) * rng.choice([-1, 1], 200):
        y = float(fmt(x))
        assert math.isclose(y, x, rel_tol=5e-4), (x, y)


def test_fmt_ci():
    assert fmt_ci([0.5850796638421836, 0.9163826833918045]) == "[0.5851, 0.9164]"
    assert fmt_ci(None) == "-"


def test_text_view_fits_the_width_and_shortens_text_first():
    rows = [{"rank": i, "score": 1 / (i + 1), "prompt": "word " * 40} for i in range(3)]
    t = Table(rows)
    text = t.text(width=60)
    lines = text.splitlines()
    assert all(len(ln) <= 60 for ln in lines)
    assert lines[2].split()[:2] == ["0", "1.000"] and lines[2].endswith("…")
    assert "not shown" not in text
    # HTML keeps the full text, escaped
    rows[0]["prompt"] = "<script>alert(1)</script>"
    h = Table(rows).html()
    assert "&lt;script&gt;" in h and "<script>" not in h and "word " * 40 in h


def test_text_view_names_the_columns_it_leaves_out():
    rows = [{"name": "a", **{f"column_{k}": k + 0.5 for k in range(12)}}]
    text = Table(rows).text(width=50)
    assert all(len(ln) <= 50 for ln in text.splitlines()[:3])
    left = text.splitlines()[-1]
    assert left.startswith("(not shown here:") and "column_11" in left
    shown = text.splitlines()[0].split()
    omitted = left.split(": ")[1].split("; ")[0].split(", ")
    assert shown[0] == "name" and set(shown[1:]) | set(omitted) == set(rows[0]) - {"name"}
    assert not set(shown) & set(omitted)


def test_control_characters_never_reach_the_text_view():
    text = Table([{"prompt": "a\x1b[31mred\x07"}]).text(width=80)
    assert "\x1b" not in text and "\x07" not in text and "\\x1b" in text


def test_ranking_table_shows_score_ci_and_prompt(tmp_path):
    from conftest import synthetic_pair

    from divscope.estimators.ranking import rank_prompts
    from divscope.samples import load_pair

    fa, fb, _ = synthetic_pair(tmp_path, n_prompts=4, n_resp=3)
    r = rank_prompts(*load_pair(fa, fb), n_bootstrap=50)
    t = ranking_table(r, top=2)
    lines = t.text(width=100).splitlines()
    assert lines[0].split()[:4] == ["rank", "idx", "mc_kl", "95%"]
    top = min((p for p in r.prompts if p.rank), key=lambda p: p.rank)
    assert lines[2].split()[:2] == ["1", str(top.index)]
    assert fmt(top.scores["mc_kl"]) in lines[2] and fmt_ci(top.ci["mc_kl"]) in lines[2]
    assert top.prompt in lines[2] and len(lines) == 4  # --top 2
    assert "topk_kl_lb" in t.html() and "topk_kl_lb" not in lines[0]


def test_checks_table_says_what_each_check_tests():
    checks = {"no_nan": {"ok": True}, "js_in_0_ln2": {"ok": False, "max": 0.9}, "all_ok": False}
    text = checks_table(checks, {"no_nan": "finite", "js_in_0_ln2": "0 <= JS <= ln 2"}).text()
    lines = text.splitlines()[2:]
    assert lines[0].split() == ["ok", "no_nan", "-", "(finite)"]
    assert lines[1].split()[:2] == ["FAIL", "js_in_0_ln2"]
    assert lines[1].endswith("max=0.9000 (0 <= JS <= ln 2)")
