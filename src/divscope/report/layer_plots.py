"""The figure of ``divscope diff --layers``: where inside the model KL(A||B) arises."""

from __future__ import annotations

from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from divscope.report.plots import _axes, _layout


def layer_fractions(doc: dict[str, Any], ax: Axes | None = None) -> Figure:
    """Blocks on the x axis: each block's fraction of KL(A||B) in both walk orders (CIs from
    resampled prompts) and, on the right axis, the residual stream's relative drift after it
    (with A's own numerical floor). ``doc`` is a ``layers.json`` document."""
    recs = doc["layers"]
    x = np.array([r["layer"] for r in recs])
    fig, ax = _axes(ax, (max(7.0, 0.28 * len(x) + 3), 4.2))
    for name, shift, color, label in (
        ("fraction", -0.15, "C0", "walk B->A"),
        ("fraction_reverse", 0.15, "C1", "walk A->B"),
    ):
        v = np.array([r[name] for r in recs])
        ci = np.array([r[f"{name}_ci"] for r in recs]).T
        err = [np.nan_to_num(v - ci[0]), np.nan_to_num(ci[1] - v)]
        ax.errorbar(x + shift, v, yerr=err, fmt="o", ms=4, capsize=2, color=color, label=label)
    ax.axhline(0, color="grey", lw=0.5)
    ax.set_xlabel("block (its output: the residual stream after it)")
    ax.set_ylabel("fraction of KL(A||B)")
    right = ax.twinx()
    right.plot(x, [r["drift_rel_norm"] for r in recs], color="C2", lw=1.2, label="drift")
    right.plot(x, [r["drift_rel_norm_floor"] for r in recs], color="C2", lw=0.8, ls=":",
               label="drift floor (A vs A)")  # fmt: skip
    right.set_ylabel("relative drift |h_B - h_A| / |h_A|", color="C2")
    handles = ax.get_legend_handles_labels()[0] + right.get_legend_handles_labels()[0]
    ax.legend(handles=handles, fontsize=8, loc="upper left")
    title = (
        f"Where {doc['model_a']} vs {doc['model_b']} differ: KL(A||B) "
        f"{doc['kl_total']:.4g} nats/token; embeddings {doc['embedding_fraction']:.2f}, "
        f"head {doc['head_fraction']:.2f}"
    )
    _layout(fig, ax, title)
    return fig
