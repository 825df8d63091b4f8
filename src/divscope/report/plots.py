"""Figures for prompt rankings. Each function takes ``ax=None`` and returns the figure."""

from __future__ import annotations

import textwrap
from collections.abc import Sequence

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.axes import Axes
from matplotlib.colors import TwoSlopeNorm
from matplotlib.figure import Figure
from matplotlib.transforms import Bbox

from divscope.estimators.ranking import Ranking, category_summary


def _axes(ax: Axes | None, figsize: tuple[float, float]) -> tuple[Figure, Axes]:
    if ax is None:
        fig, ax = plt.subplots(figsize=figsize)
        return fig, ax
    return ax.figure, ax


def literal(text: str) -> str:
    """``text`` as matplotlib shows it literally: every ``$`` escaped, so that no part of a
    prompt, a model or persona name or a token is parsed as mathtext (``echo $USER_$HOST``
    would raise). Apply it last, to the exact string an artist gets."""
    return str(text).replace("$", r"\$")


def fit_title(ax: Axes, text: str, *, loc: str = "center", **kwargs: object) -> None:
    """Set the title, wrapped onto as many lines as it takes to stay within the axes' width
    (so it never runs over a colorbar or the next panel); shown literally (no mathtext)."""
    renderer = ax.figure.canvas.get_renderer()
    title = ax.set_title(literal(text), loc=loc, **kwargs)
    avail = ax.get_window_extent(renderer).width
    chars = len(text)
    while title.get_window_extent(renderer).width > avail and chars > 12:
        chars = max(
            12, min(chars - 2, int(chars * avail / title.get_window_extent(renderer).width))
        )
        title.set_text(literal("\n".join(textwrap.fill(p, chars) for p in text.split("\n"))))


def _layout(fig: Figure, ax: Axes, title: str, **kwargs: object) -> None:
    """tight_layout with a title fitted to the axes it ends up with."""
    for _ in range(2):  # the wrapped title changes the layout, which changes the width
        fig.tight_layout()
        fit_title(ax, title, **kwargs)
    fig.tight_layout()


def rotate_ticks(ax: Axes, angle: float = 30) -> None:
    """Slanted x tick labels that end under their tick (not centred across the next one)."""
    plt.setp(ax.get_xticklabels(), rotation=angle, ha="right", rotation_mode="anchor")


def label_points(
    ax: Axes,
    xs: Sequence[float],
    ys: Sequence[float],
    labels: Sequence[str],
    *,
    order: Sequence[int] | None = None,
    fontsize: float = 6,
    limit: int | None = None,
) -> int:
    """Label each point where its label fits: beside the point, inside the axes, clear of every
    point and every label already placed (tried in ``order``, e.g. most interesting first, up
    to ``limit`` labels). Call it once the layout is final. Returns how many were placed.
    Labels are shown literally (no mathtext)."""
    fig = ax.figure
    labels = [literal(x) for x in labels]
    renderer = fig.canvas.get_renderer()
    pts = ax.transData.transform(np.column_stack([xs, ys]))
    r = 4.0  # pixels around a marker
    taken = [Bbox.from_extents(x - r, y - r, x + r, y + r) for x, y in pts]
    frame = ax.get_window_extent(renderer).padded(-2)
    sides = [(1, 1, "left", "bottom"), (1, -1, "left", "top"), (-1, 1, "right", "bottom")]
    sides += [(-1, -1, "right", "top"), (1, 0, "left", "center"), (-1, 0, "right", "center")]
    sides += [(0, 1, "center", "bottom"), (0, -1, "center", "top")]
    placed = 0
    for i in order if order is not None else range(len(labels)):
        if limit is not None and placed >= limit:
            break
        for dist in (3, 8, 14):
            for dx, dy, ha, va in sides:
                kw = {"xytext": (dx * dist, dy * dist), "textcoords": "offset points"}
                kw |= {"ha": ha, "va": va, "fontsize": fontsize}
                t = ax.annotate(labels[i], (xs[i], ys[i]), **kw)
                box = t.get_window_extent(renderer).padded(1)
                t.remove()
                inside = frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0
                if inside and box.y1 <= frame.y1 and not any(box.overlaps(b) for b in taken):
                    if dist > 3:  # a thin leader line to a label set further off
                        kw["arrowprops"] = {"arrowstyle": "-", "lw": 0.4, "color": "0.5"}
                    ax.annotate(labels[i], (xs[i], ys[i]), **kw)
                    taken.append(box)
                    placed += 1
                    break
            else:
                continue
            break
    return placed


def _label(prompt: str, n: int = 40) -> str:
    """A prompt on one line, cut to ``n`` characters, as a literal tick label."""
    s = " ".join(prompt.split())
    return literal(s if len(s) <= n else s[: n - 1] + "…")


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
    fig, ax = _axes(ax, (5 + 1.3 * len(metrics), max(3.0, 1.2 + 0.4 * len(rows))))
    sns.heatmap(
        data,
        annot=True,
        fmt=".3f",
        cmap="viridis",
        ax=ax,
        xticklabels=metrics,
        yticklabels=[f"#{p.index} {_label(p.prompt)}" for p in rows],
        cbar_kws={"label": f"{base} [{ranking.units.get(metrics[0], '')}]"},
    )
    rotate_ticks(ax)
    _layout(fig, ax, f"{ranking.models[0]} vs {ranking.models[1]}: prompts x metrics")
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
    ax.axvline(0, color="grey", lw=0.5)
    _layout(fig, ax, f"Prompts ranked by {metric} ({round(ranking.ci_level * 100)}% bootstrap CI)")
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
    _layout(fig, ax, f"Distribution of {metric} over {len(v)} prompts")
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
    ax.bar([literal(r["category"]) for r in rows], m, yerr=[m - lo, hi - m], capsize=3, color="C1")
    ax.set_ylabel(f"mean {metric} [{ranking.units.get(metric, '')}]")
    rotate_ticks(ax)
    level = round(ranking.ci_level * 100)
    _layout(fig, ax, f"{metric} by prompt category ({level}% bootstrap CI over prompts)")
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
            probe.set_text(literal(part.replace(" ", "\u00a0")))
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
            literal(text.replace(" ", "\u00a0")),
            bbox={"boxstyle": "square,pad=0.05", "fc": color, "ec": "none"},
            **style,
        )
    fit_title(ax, title, loc="left", fontsize=9)
    return fig
