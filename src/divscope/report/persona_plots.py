"""Figures for persona runs. Each function takes ``ax=None`` and returns the figure."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from divscope.report.plots import _axes, _layout, label_points, literal, rotate_ticks


def cluster_order(distance: np.ndarray) -> list[int]:
    """Leaf order of average-linkage clustering on a symmetric distance matrix."""
    from scipy.cluster.hierarchy import leaves_list, linkage
    from scipy.spatial.distance import squareform

    d = np.asarray(distance, dtype=float)
    if len(d) < 3:
        return list(range(len(d)))
    d = 0.5 * (d + d.T)
    np.fill_diagonal(d, 0.0)
    return leaves_list(linkage(squareform(np.maximum(d, 0), checks=False), "average")).tolist()


def matrix_heatmap(
    matrix: np.ndarray,
    names: list[str],
    *,
    title: str,
    label: str,
    order: list[int] | None = None,
    diverging: bool = False,
    ax: Axes | None = None,
) -> Figure:
    """An N x N persona matrix, rows/columns in ``order`` (e.g. :func:`cluster_order`)."""
    import seaborn as sns

    order = order or list(range(len(names)))
    m = np.asarray(matrix, dtype=float)[np.ix_(order, order)]
    n = len(names)
    longest = max((len(x) for x in names), default=0)  # the tick labels take room too
    fig, ax = _axes(ax, (2.4 + 0.6 * n + 0.07 * longest, 1.6 + 0.55 * n + 0.05 * longest))
    kw = {"cmap": "RdBu_r", "center": 0.0} if diverging else {"cmap": "viridis"}
    sns.heatmap(
        m,
        ax=ax,
        annot=n <= 12,
        fmt=".3f",
        annot_kws={"fontsize": 7},
        xticklabels=[literal(names[i]) for i in order],
        yticklabels=[literal(names[i]) for i in order],
        cbar_kws={"label": literal(label)},
        square=True,
        **kw,
    )
    rotate_ticks(ax, 45)
    _layout(fig, ax, title)
    _fit_cell_text(ax, n)
    return fig


def _fit_cell_text(ax: Axes, n: int) -> None:
    """Shrink the cell annotations until each fits its cell (dropped below 5 pt)."""
    if not ax.texts:
        return
    renderer = ax.figure.canvas.get_renderer()
    cell = ax.get_window_extent(renderer).width / n
    widest = max(t.get_window_extent(renderer).width for t in ax.texts)
    if widest <= 0.9 * cell:
        return
    size = ax.texts[0].get_fontsize() * 0.9 * cell / widest
    for t in list(ax.texts):
        if size < 5:
            t.remove()
        else:
            t.set_fontsize(size)


def js_vs_cosine(
    js: np.ndarray,
    cosine: np.ndarray,
    names: list[str],
    *,
    layer: str,
    kind: str = "centred",
    ax: Axes | None = None,
) -> Figure:
    """Upper-triangle JS against cosine for one layer, with Spearman's rho in the title; up to
    12 pairs are labelled where a label fits, the farthest and closest by JS first."""
    from scipy.stats import spearmanr

    iu = np.triu_indices(len(names), 1)
    x, y = np.asarray(cosine)[iu], np.asarray(js)[iu]
    fig, ax = _axes(ax, (5.5, 4.5))
    ax.scatter(x, y, s=18)
    rho = spearmanr(x, y).statistic if len(x) > 2 else float("nan")
    ax.set_xlabel(literal(f"{kind} cosine, hidden_states[{layer}]"))
    ax.set_ylabel("JS [nats]")
    ax.margins(0.15)
    _layout(fig, ax, f"layer {layer}: Spearman rho = {rho:.2f} (n = {len(x)} pairs)")
    by_js = np.argsort(-y)
    order = [int(k) for pair in zip(by_js, by_js[::-1], strict=True) for k in pair]
    labels = [f"{names[i]}/{names[j]}" for i, j in zip(*iu, strict=True)]
    label_points(ax, x, y, labels, order=list(dict.fromkeys(order)), limit=12)
    return fig


def leakage_side_by_side(
    leakage_result: dict,
    cosine_key: str,
    cosine_values: list[float],
    *,
    axes: list[Axes] | None = None,
) -> Figure:
    """JS vs leakage and cosine vs leakage on the same directed pairs, side by side.

    ``leakage_result`` is ``analyze(...)["leakage"]``; ``cosine_values`` are the cosine of
    its ``directed_pairs`` in the same order.
    """
    pairs = leakage_result["directed_pairs"]
    leak = [p["leakage_rate"] for p in pairs]
    js = [p["js"] for p in pairs]
    if axes is None:
        fig, axes = plt.subplots(1, 2, figsize=(9, 4), sharey=True)
    fig = axes[0].figure
    sources = sorted({p["source"] for p in pairs})
    colors = {s: f"C{i}" for i, s in enumerate(sources)}
    c = [colors[p["source"]] for p in pairs]
    cos_entry = leakage_result["cosine"].get(cosine_key, {})
    for ax, x, label, rho in (
        (axes[0], js, "JS [nats]", leakage_result["js_spearman_rho"]),
        (axes[1], cosine_values, literal(f"cosine {cosine_key}"), cos_entry.get("spearman_rho")),
    ):
        ax.scatter(x, leak, c=c, s=20)
        ax.set_xlabel(label)
        ax.set_title(f"Spearman rho = {rho:.3f}" if rho is not None else "rho undefined")
    axes[0].set_ylabel("leakage rate (source -> target)")
    for s in sources:
        axes[1].scatter([], [], c=colors[s], label=literal(s), s=20)
    axes[1].legend(title="source", fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    cmp = cos_entry.get("comparison")
    if cmp:
        fig.suptitle(
            f"n = {len(pairs)} directed pairs; |rho_JS| - rho_cos = "
            f"{cmp['difference']:.3f}, MRR z = {cmp['statistic']:.2f}, "
            f"p = {cmp['p']:.3g}",
            fontsize=9,
        )
    fig.tight_layout()
    return fig


def kl_asymmetry_vs_leakage(kl_result: dict, ax: Axes | None = None) -> Figure:
    """Signed KL asymmetry against signed leakage asymmetry (``analyze(...)["kl_asymmetry"]``)."""
    rows = kl_result.get("pairs", [])
    fig, ax = _axes(ax, (5.5, 4.5))
    x = [r["kl_asym"] for r in rows]
    y = [r["leak_asym"] for r in rows]
    ax.scatter(x, y, s=22)
    ax.axhline(0, color="grey", lw=0.5)
    ax.axvline(0, color="grey", lw=0.5)
    ax.set_xlabel("KL(P_a||P_b) - KL(P_b||P_a) [nats]")
    ax.set_ylabel("leak(a->b) - leak(b->a)")
    ax.margins(0.15)
    rho = (kl_result.get("signed") or {}).get("spearman_rho")
    _layout(
        fig,
        ax,
        f"KL vs leakage asymmetry (n = {len(rows)}, rho = {rho:.2f})"
        if rho is not None
        else "KL vs leakage asymmetry",
    )
    order = np.argsort(-np.hypot(np.asarray(x, float), np.asarray(y, float)))
    label_points(ax, x, y, [f"{r['a']}/{r['b']}" for r in rows], order=order.tolist())
    return fig


def cosine_by_layer(
    curves: dict[str, list[float]], layers: list[int], keys: list[str], ax: Axes | None = None
) -> Figure:
    """Centred cosine across layers for the persona pairs ``keys`` (``"a|b"`` of ``curves``,
    e.g. :func:`divscope.personas.explain.pair_cosine_by_layer`); the legend sits beside the
    axes, never over a line."""
    fig, ax = _axes(ax, (8, 4))
    for key in dict.fromkeys(keys):
        ax.plot(layers, curves[key], marker="o", label=literal(key.replace("|", " / ")))
    ax.set(xlabel="hidden_states index", ylabel="centred cosine", xticks=layers)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), title="pair")
    _layout(fig, ax, "centred cosine by layer, farthest and closest pairs by JS")
    return fig
