"""Every figure the demos, `divscope analyze` and the reports make, rendered at the size and
resolution they are saved: no two texts overlap, no text runs over another axes (a colorbar,
the next panel), no legend covers plotted data."""

from __future__ import annotations

import json

import matplotlib
import numpy as np
import pytest
from conftest import DATA, ROOT
from figcheck import drawn_texts, overlaps

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from divscope.report import persona_plots as pp  # noqa: E402
from divscope.report import plots  # noqa: E402

REF = DATA / "reference_qwen7b"
SHIPPED = ROOT / "data/samples/smollm2_vs_gemma3"


@pytest.fixture(scope="module")
def ranking():
    from divscope.estimators.ranking import rank_prompts
    from divscope.samples import load_pair

    a, b = load_pair(SHIPPED / "smollm2-135m-instruct.jsonl", SHIPPED / "gemma-3-270m.jsonl")
    return a, b, rank_prompts(a, b, n_bootstrap=50)


@pytest.fixture(scope="module")
def reference():
    from divscope.stats import analysis as stats

    m = stats.load_matrices(REF / "divergence_matrices.json")
    cos = stats.load_cosine(REF / "cosine_11_l20.json")
    cos += stats.load_cosine(REF / "cosine_leakage_correlation.json")
    return m, cos, stats.analyze(m, cos, stats.load_leakage(REF), n_perm=99, n_boot=50)


def _ranking_figures(a, b, r):
    from divscope.estimators.contributions import token_contributions

    top = min((p for p in r.prompts if p.rank), key=lambda p: p.rank)
    tokens, values, kind = token_contributions(a.record(top.index), b.record(top.index), 0)
    # the kl_demo titles, files and models (the longest ones it makes)
    files = (
        f"A's response 0 to prompt #{top.index}: per-token {kind} contribution (red: A more "
        "likely than B; blue: B more likely; grey: not matched in B)"
    )
    exact = f"A's response 0 to prompt #{top.index}: exact KL(P_A||P_B) at each position (nats; darker: more different)"  # noqa: E501
    return {
        "top_prompt_tokens": plots.token_view(tokens, values, title=files),
        "top_prompt_tokens_models": plots.token_view(tokens, np.abs(values), title=exact),
        "heatmap_prompts_x_metrics": plots.score_heatmap(r, top=10),
        "report_heatmap": plots.score_heatmap(r, top=15),
        "ranked_scores": plots.ranked_scores(r, top=10),
        "score_distribution": plots.score_distribution(r),
        "category_means": plots.category_means(r),
    }


def _persona_figures(m, cos, res, n):
    from divscope.personas.explain import pair_cosine_by_layer

    names, js = m.names[:n], m.js[:n, :n]
    kl = m.kl[:n, :n]
    order = pp.cluster_order(js)
    c = cos[0]
    idx = [c.names.index(x) for x in names]
    cmat = c.matrix[np.ix_(idx, idx)]
    figs = {
        "js": pp.matrix_heatmap(
            js, names, order=order, label="JS [nats]",
            title="JS between personas (teacher-forced, symmetric)",
        ),
        "kl_asym": pp.matrix_heatmap(
            kl - kl.T, names, order=order, diverging=True, label="nats",
            title="KL asymmetry: KL(P_row || P_col) - KL(P_col || P_row), row's answers vs col's",
        ),
        "cosine_l20": pp.matrix_heatmap(
            cmat, names, order=order, diverging=True, label="cosine",
            title="centred cosine, hidden_states[20]",
        ),
        "analyze_kl": pp.matrix_heatmap(kl, names, order=order, label="nats", title="KL(P_row || P_col)"),
        "js_vs_cosine_l20": pp.js_vs_cosine(js, cmat, names, layer="20"),
    }  # fmt: skip
    layers = [8, 15, 22, 30]
    cosine = {"layers": layers, "centred": {str(x): cmat.tolist() for x in layers}}
    iu = np.triu_indices(n, 1)
    ranked = sorted(zip(js[iu], *iu, strict=True), reverse=True)
    keys = [f"{names[i]}|{names[j]}" for _, i, j in ranked[:5] + ranked[-3:]]
    figs["cosine_by_layer"] = pp.cosine_by_layer(pair_cosine_by_layer(cosine, names), layers, keys)
    return figs


def _leakage_figures(cos, res):
    lk = res["leakage"]
    figs = {}
    for key in lk["cosine"]:
        cm = next(x for x in cos if x.key == key)
        vals = [cm.value(p["source"], p["target"]) for p in lk["directed_pairs"]]
        figs["leakage_" + key.replace("/", "_")] = pp.leakage_side_by_side(lk, key, vals)
    figs["kl_asymmetry_vs_leakage"] = pp.kl_asymmetry_vs_leakage(res["kl_asymmetry"])
    return figs


def _check(figs: dict) -> None:
    bad = {}
    for name, fig in figs.items():
        fig.set_dpi(120)  # the demos and the report save at 120 dpi
        found = overlaps(fig)
        if found:
            bad[name] = found[:3]
        plt.close(fig)
    assert not bad, bad


def test_ranking_figures_have_no_overlapping_text(ranking):
    _check(_ranking_figures(*ranking))


@pytest.mark.parametrize("n", [6, 11])
def test_persona_figures_have_no_overlapping_text(reference, n):
    _check(_persona_figures(*reference, n))


def test_leakage_figures_have_no_overlapping_text(reference):
    _, cos, res = reference
    _check(_leakage_figures(cos, res))


def test_the_checker_sees_overlaps():
    """The check itself: overlapping texts, a title over a colorbar, a legend over a line."""
    fig, ax = plt.subplots(figsize=(3, 2))
    ax.text(0.5, 0.5, "one label here")
    ax.text(0.52, 0.5, "another label")
    assert overlaps(fig)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(3, 3))
    fig.colorbar(ax.imshow(np.eye(3)), ax=ax)
    ax.set_title("a title much too long for its axes, running over the colorbar")
    assert any("<axes" in b for _, b in overlaps(fig))
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(3, 3))
    ax.plot([0, 1], [1, 0], label="a line under the legend")
    ax.legend(loc="upper left")
    assert ("<legend>", "<data of ''>") in overlaps(fig)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(4, 3))
    ax.set_xticks(range(5), [f"a long tick label {i}" for i in range(5)], rotation=45, ha="right")
    assert not overlaps(fig) and len(drawn_texts(fig)) >= 5  # slanted, side by side: fine
    plt.close(fig)


def test_figure_labels_say_their_units(ranking):
    """The prompts x metrics heatmap's colorbar names the metric and its unit."""
    _, _, r = ranking
    fig = plots.score_heatmap(r, top=5)
    labels = [ax.get_ylabel() for ax in fig.axes]
    assert "mc_kl [nats/byte]" in labels
    plt.close(fig)


def test_scatter_points_are_labelled(reference):
    m, cos, res = reference
    figs = _persona_figures(m, cos, res, 6)
    texts = {t.get_text() for t in figs["js_vs_cosine_l20"].axes[0].texts}
    i, j = np.unravel_index(np.argmax(m.js[:6, :6]), (6, 6))
    assert f"{m.names[min(i, j)]}/{m.names[max(i, j)]}" in texts and len(texts) >= 8
    for f in figs.values():
        plt.close(f)
    fig = pp.kl_asymmetry_vs_leakage(res["kl_asymmetry"])
    assert len(fig.axes[0].texts) == res["kl_asymmetry"]["n_pairs"]
    plt.close(fig)
    json.dumps(res["kl_asymmetry"])  # the result the figure reads is plain data


# ---------------------------------------------------------------- user text is literal

DOLLARS = "echo $USER_$HOST"  # two $ signs: matplotlib's mathtext would parse (and fail on) it


def _literal_everywhere(figs: dict) -> None:
    """Every figure draws, and every drawn text with a $ in it is shown as typed, not as math."""
    from matplotlib import cbook

    for name, fig in figs.items():
        texts = [t.get_text() for t in drawn_texts(fig)]  # raised in mathtext before the fix
        plt.close(fig)
        dollars = [t for t in texts if "$" in t]
        assert dollars, name  # the user text is in the figure
        assert not [t for t in dollars if cbook.is_math_text(t)], (name, dollars)


def _dollar_pair(tmp_path, n: int = 8):
    """The first ``n`` prompts of the shipped pair, each prompt and category with two $."""
    paths = []
    for name in ("smollm2-135m-instruct.jsonl", "gemma-3-270m.jsonl"):
        recs = [json.loads(x) for x in (SHIPPED / name).read_text().splitlines()[:n]]
        for r in recs:
            r["prompt"] = f"{DOLLARS} {r['prompt']}"
            r["category"] = f"${r['category']}_$"
        paths.append(tmp_path / name)
        paths[-1].write_text("".join(json.dumps(r) + "\n" for r in recs))
    return paths


def test_ranking_figures_show_dollar_signs_literally(tmp_path):
    from divscope.estimators.ranking import rank_prompts
    from divscope.samples import load_pair

    a, b = load_pair(*_dollar_pair(tmp_path))
    r = rank_prompts(a, b, n_bootstrap=20)
    figs = _ranking_figures(a, b, r)
    figs["tokens_with_dollars"] = plots.token_view(
        ["$x_", "$", "a$b$c", "\\$y_$"], np.array([0.1, -0.2, 0.3, np.nan]), title=DOLLARS
    )
    for name in ("score_distribution", "top_prompt_tokens", "top_prompt_tokens_models"):
        plt.close(figs.pop(name))  # no $ in these (the prompt is not in them)
    _literal_everywhere(figs)


def test_persona_figures_show_dollar_signs_literally(reference):
    m, cos, res = reference
    n = 6
    names = [f"${x}_$" for x in m.names[:n]]
    rename = dict(zip(m.names, names, strict=False))
    c = cos[0]
    idx = [c.names.index(x) for x in m.names[:n]]
    lk = json.loads(json.dumps(res["leakage"]))
    for p in lk["directed_pairs"]:
        p["source"], p["target"] = f"${p['source']}_$", f"${p['target']}_$"
    key = next(iter(lk["cosine"]))
    kl = json.loads(json.dumps(res["kl_asymmetry"]))
    for p in kl["pairs"]:
        p["a"], p["b"] = rename.get(p["a"], f"${p['a']}_$"), rename.get(p["b"], f"${p['b']}_$")
    figs = {
        "heatmap": pp.matrix_heatmap(m.js[:n, :n], names, label="JS [nats]", title=DOLLARS),
        "js_vs_cosine": pp.js_vs_cosine(
            m.js[:n, :n], c.matrix[np.ix_(idx, idx)], names, layer="$l_$"
        ),  # fmt: skip
        "cosine_by_layer": pp.cosine_by_layer(
            {f"{names[0]}|{names[1]}": [0.1, 0.2]}, [1, 2], [f"{names[0]}|{names[1]}"]
        ),
        "leakage": pp.leakage_side_by_side(lk, key, [0.5] * len(lk["directed_pairs"])),
        "kl_asymmetry": pp.kl_asymmetry_vs_leakage(kl),
    }
    _literal_everywhere(figs)
