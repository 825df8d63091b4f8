"""Figures for persona runs. Each function takes ``ax=None`` and returns the figure."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure


def _axes(ax: Axes | None, size: tuple[float, float]) -> tuple[Figure, Axes]:
    if ax is None:
        fig, ax = plt.subplots(figsize=size)
        return fig, ax
    return ax.figure, ax


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
    fig, ax = _axes(ax, (1.8 + 0.55 * n, 1.2 + 0.5 * n))
    kw = {"cmap": "RdBu_r", "center": 0.0} if diverging else {"cmap": "viridis"}
    sns.heatmap(
        m,
        ax=ax,
        annot=n <= 12,
        fmt=".3f",
        annot_kws={"fontsize": 7},
        xticklabels=[names[i] for i in order],
        yticklabels=[names[i] for i in order],
        cbar_kws={"label": label},
        square=True,
        **kw,
    )
    ax.set_title(title)
    ax.set_xticklabels(ax.get_xticklabels(), rotation=45, ha="right")
    fig.tight_layout()
    return fig


def js_vs_cosine(
    js: np.ndarray,
    cosine: np.ndarray,
    names: list[str],
    *,
    layer: str,
    kind: str = "centred",
    ax: Axes | None = None,
) -> Figure:
    """Upper-triangle JS against cosine for one layer, with Spearman's rho in the title."""
    from scipy.stats import spearmanr

    iu = np.triu_indices(len(names), 1)
    x, y = np.asarray(cosine)[iu], np.asarray(js)[iu]
    fig, ax = _axes(ax, (4.5, 4))
    ax.scatter(x, y, s=18)
    rho = spearmanr(x, y).statistic if len(x) > 2 else float("nan")
    ax.set_xlabel(f"{kind} cosine, hidden_states[{layer}]")
    ax.set_ylabel("JS [nats]")
    ax.set_title(f"layer {layer}: Spearman rho = {rho:.2f} (n = {len(x)} pairs)")
    fig.tight_layout()
    return fig
