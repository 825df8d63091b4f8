"""Figures for prompt rankings. Each function takes ``ax=None`` and returns the figure."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.axes import Axes
from matplotlib.colors import TwoSlopeNorm
from matplotlib.figure import Figure

from divscope.estimators.ranking import Ranking, category_summary


def _axes(ax: Axes | None, figsize: tuple[float, float]) -> tuple[Figure, Axes]:
    if ax is None:
        fig, ax = plt.subplots(figsize=figsize)
        return fig, ax
    return ax.figure, ax


def _label(prompt: str, n: int = 40) -> str:
    s = " ".join(prompt.split())
    return s if len(s) <= n else s[: n - 1] + "…"


def score_heatmap(
    ranking: Ranking, metrics: list[str] | None = None, top: int | None = 30, ax: Axes | None = None
) -> Figure:
    """Prompts (rows, best rank first) x metrics (columns); cells hold the scores.

    By default the columns are the ranked metric's family (mean, ``_ab``, ``_ba``), so that
    one colour scale means one thing.
    """
    import seaborn as sns

    base = ranking.metric.removesuffix("_ab").removesuffix("_ba")
    metrics = metrics or [
        m for m in ranking.available if m.removesuffix("_ab").removesuffix("_ba") == base
    ]
    rows = sorted([p for p in ranking.prompts if p.rank is not None], key=lambda p: p.rank)[:top]
    data = np.array(
        [[np.nan if p.scores.get(m) is None else p.scores[m] for m in metrics] for p in rows],
        dtype=float,
    ).reshape(len(rows), len(metrics))
    fig, ax = _axes(ax, (3 + 1.3 * len(metrics), max(3.0, 1.2 + 0.4 * len(rows))))
    sns.heatmap(
        data,
        annot=True,
        fmt=".3f",
        cmap="viridis",
        ax=ax,
        xticklabels=metrics,
        yticklabels=[f"#{p.index} {_label(p.prompt)}" for p in rows],
        cbar_kws={"label": "score"},
    )
    ax.set_title(f"{ranking.models[0]} vs {ranking.models[1]}: prompts x metrics")
    ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    return fig


def ranked_scores(
    ranking: Ranking, metric: str | None = None, top: int | None = 30, ax: Axes | None = None
) -> Figure:
    """Scores with bootstrap CIs, most different prompt at the top."""
    metric = metric or ranking.metric
    rows = sorted(
        [p for p in ranking.prompts if p.scores.get(metric) is not None],
        key=lambda p: -p.scores[metric],
    )[:top]
    fig, ax = _axes(ax, (8, 1.2 + 0.35 * len(rows)))
    y = np.arange(len(rows))[::-1]
    v = np.array([p.scores[metric] for p in rows])
    lo = np.array([p.ci[metric][0] if p.ci.get(metric) else np.nan for p in rows])
    hi = np.array([p.ci[metric][1] if p.ci.get(metric) else np.nan for p in rows])
    ax.errorbar(v, y, xerr=[np.nan_to_num(v - lo), np.nan_to_num(hi - v)], fmt="o", capsize=3)
    ax.set_yticks(y, [f"#{p.index} {_label(p.prompt)}" for p in rows])
    ax.set_xlabel(f"{metric} [{ranking.units.get(metric, '')}]")
    ax.set_title(f"Prompts ranked by {metric} ({int(ranking.ci_level * 100)}% bootstrap CI)")
    ax.axvline(0, color="grey", lw=0.5)
    fig.tight_layout()
    return fig


def score_distribution(
    ranking: Ranking, metric: str | None = None, ax: Axes | None = None
) -> Figure:
    """Histogram of one metric over prompts, with each prompt as a rug tick."""
    metric = metric or ranking.metric
    v = np.array([p.scores[metric] for p in ranking.prompts if p.scores.get(metric) is not None])
    fig, ax = _axes(ax, (6, 3.5))
    ax.hist(v, bins=max(5, min(40, len(v) // 2 or 1)), color="C0", alpha=0.7)
    ax.plot(v, np.zeros_like(v), "|", color="k", ms=20)
    ax.set_xlabel(f"{metric} [{ranking.units.get(metric, '')}]")
    ax.set_ylabel("prompts")
    ax.set_title(f"Distribution of {metric} over {len(v)} prompts")
    fig.tight_layout()
    return fig


def category_means(
    ranking: Ranking,
    metric: str | None = None,
    n_bootstrap: int = 1000,
    seed: int = 0,
    ax: Axes | None = None,
) -> Figure:
    """Mean score per prompt category with a bootstrap CI over the category's prompts."""
    metric = metric or ranking.metric
    rows = category_summary(ranking, metric, n_bootstrap, seed)
    m = np.array([r["mean"] for r in rows])
    lo = np.array([r["ci_low"] if r["ci_low"] is not None else r["mean"] for r in rows])
    hi = np.array([r["ci_high"] if r["ci_high"] is not None else r["mean"] for r in rows])
    fig, ax = _axes(ax, (1.5 + 0.7 * len(rows), 4))
    ax.bar([r["category"] for r in rows], m, yerr=[m - lo, hi - m], capsize=3, color="C1")
    ax.set_ylabel(f"mean {metric} [{ranking.units.get(metric, '')}]")
    ax.set_title(
        f"{metric} by prompt category ({int(ranking.ci_level * 100)}% bootstrap CI over prompts)"
    )
    ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    return fig


def token_view(
    tokens: list[str],
    values: np.ndarray,
    *,
    title: str = "",
    max_tokens: int = 400,
    fontsize: float = 8.0,
    width_in: float = 11.0,
    label: str = "nats per token",
    ax: Axes | None = None,
) -> Figure:
    """Tokens laid out as running text, each on a background coloured by its contribution.

    Red is positive (A likes the token more than B), blue negative, grey NaN (not matched).
    Tokens are measured with the figure's renderer, so boxes never overlap.
    """
    tokens = tokens[:max_tokens]
    values = np.asarray(values[:max_tokens], dtype=float)
    finite = values[np.isfinite(values)]
    lim = float(np.max(np.abs(finite))) if finite.size else 1.0
    norm = TwoSlopeNorm(vcenter=0.0, vmin=-(lim or 1.0), vmax=lim or 1.0)
    cmap = plt.get_cmap("coolwarm")
    fig, ax = _axes(ax, (width_in, 2.0))
    ax.set_axis_off()
    sm = plt.cm.ScalarMappable(norm=norm, cmap=cmap)
    fig.colorbar(sm, ax=ax, fraction=0.02, pad=0.01, label=label)  # before measuring the width
    renderer = fig.canvas.get_renderer()
    avail = ax.get_window_extent(renderer).width
    style = {"family": "monospace", "fontsize": fontsize, "va": "center", "ha": "left"}
    probe = ax.text(0, 0, "", **style)
    pieces: list[tuple[int, float, str, float]] = []  # (line, x, text, value)
    line, x = 0, 0.0
    for tok, v in zip(tokens, values, strict=True):
        shown = tok.replace("\u2581", " ").replace("\u0120", " ").replace("\u010a", "\n")
        for k, part in enumerate(shown.split("\n")):
            if k > 0:
                line, x = line + 1, 0.0
            if not part:
                continue
            probe.set_text(part.replace(" ", "\u00a0"))
            w = probe.get_window_extent(renderer).width
            if x + w > avail and x > 0:
                line, x = line + 1, 0.0
            pieces.append((line, x, part, v))
            x += w
    probe.remove()
    n_lines = line + 1
    if len(fig.axes) == 2:  # our own figure: the text axes and its colorbar
        fig.set_size_inches(width_in, 0.7 + 0.19 * n_lines * fontsize / 8)
    ax.set_xlim(0, avail)
    ax.set_ylim(n_lines - 0.5, -0.5)
    for row, x0, text, v in pieces:
        color = (0.85, 0.85, 0.85, 1) if not np.isfinite(v) else cmap(norm(v))
        ax.text(
            x0,
            row,
            text.replace(" ", "\u00a0"),
            bbox={"boxstyle": "square,pad=0.05", "fc": color, "ec": "none"},
            **style,
        )
    ax.set_title(title, loc="left", fontsize=9)
    return fig
