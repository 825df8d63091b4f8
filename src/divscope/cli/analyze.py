"""``divscope analyze``: statistics on a persona run (JS vs cosine vs leakage), figures."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np

from divscope.cli.common import POSITIVE, command
from divscope.report.tables import analysis_summary
from divscope.runmeta import OutputError, atomic_write_json, check_writable


def add_parser(sub: Any) -> None:
    """Register ``analyze`` and its options."""
    a = command(sub, "analyze", help="statistics: JS vs cosine vs leakage")
    a.add_argument(
        "--matrices",
        required=True,
        help="divergence_matrices.json of a persona run (or the reference's format)",
    )
    a.add_argument(
        "--cosine",
        action="append",
        default=[],
        help="cosine file: a run's cosine.json, {cosine_matrix_l<k>, persona_names}, or "
        "per-pair cosine (with --leakage); repeatable (default: none)",
    )
    a.add_argument(
        "--leakage",
        default=None,
        help="leakage: CSV source,target,rate[,found,total], a marker_eval_<source>.json, or a "
        "directory of them (default: none)",
    )
    a.add_argument("--json", default=None, help="write the analysis here")
    a.add_argument("--figures", default=None, help="write figures into this directory")
    a.add_argument(
        "--overwrite", action="store_true", help="allow replacing --json and --figures outputs"
    )
    a.add_argument(
        "--std-threshold",
        type=float,
        default=0.05,
        help="discrimination gate: the std of JS over pairs must exceed this [nats]",
    )
    a.add_argument(
        "--ratio-threshold",
        type=float,
        default=3.0,
        help="discrimination gate: max / min JS over pairs must exceed this",
    )
    a.add_argument("--n-permutations", type=POSITIVE, default=9999, help="Mantel permutations")
    a.add_argument("--n-bootstrap", type=POSITIVE, default=2000, help="bootstrap resamples")
    a.add_argument("--seed", type=int, default=0, help="permutation and bootstrap seed")
    a.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Analyse the matrices (with cosines and leakage), print, write JSON and figures."""
    if args.json:  # nothing computed or written when an output would fail or be replaced
        check_writable(Path(args.json), overwrite=args.overwrite)
    if args.figures and Path(args.figures).exists() and not Path(args.figures).is_dir():
        raise OutputError(args.figures, "is a file, not a folder", "give a folder for the figures")
    if args.figures and not args.overwrite and list(Path(args.figures).glob("*.png")):
        raise FileExistsError(f"{args.figures} already holds figures")

    from divscope.stats import analysis as stats

    matrices = stats.load_matrices(args.matrices)
    leakage = stats.load_leakage(args.leakage) if args.leakage else None
    cosines = [
        c
        for f in args.cosine
        for c in stats.check_cosine_fits(f, stats.load_cosine(f), matrices, bool(leakage))
    ]
    result = stats.analyze(
        matrices,
        cosines,
        leakage,
        std_threshold=args.std_threshold,
        ratio_threshold=args.ratio_threshold,
        n_perm=args.n_permutations,
        n_boot=args.n_bootstrap,
        seed=args.seed,
    )
    for item in analysis_summary(result):
        print(item)
    if args.json:
        atomic_write_json(Path(args.json), result, overwrite=args.overwrite)
        print(f"wrote {args.json}")
    if args.figures:
        _figures(matrices, cosines, result, Path(args.figures))
        print(f"figures in {args.figures}")
    return 0


def _figures(matrices: Any, cosines: list[Any], result: dict[str, Any], out: Path) -> None:
    """The JS / KL heatmaps, JS vs each cosine, and the leakage figures, as PNGs in ``out``."""
    import matplotlib.pyplot as plt

    from divscope.report import persona_plots as pp

    out.mkdir(parents=True, exist_ok=True)

    def save(fig: Any, name: str) -> None:
        fig.savefig(out / f"{name}.png", dpi=120, bbox_inches="tight")
        plt.close(fig)

    order = pp.cluster_order(matrices.js)
    save(
        pp.matrix_heatmap(matrices.js, matrices.names, order=order, label="JS [nats]", title="JS"),
        "js",
    )
    if matrices.kl is not None:
        save(
            pp.matrix_heatmap(
                matrices.kl, matrices.names, order=order, label="nats", title="KL(P_row || P_col)"
            ),
            "kl",
        )
    for c in cosines:
        if c.key in result["redundancy"]:
            idx = [c.names.index(n) for n in matrices.names]
            save(
                pp.js_vs_cosine(
                    matrices.js,
                    c.matrix[np.ix_(idx, idx)],
                    matrices.names,
                    layer=c.key.split("layer_")[-1],
                    kind=c.key.split("/")[0],
                ),
                "js_vs_cosine_" + c.key.replace("/", "_"),
            )
    if "leakage" in result:
        _leakage_figures(result, cosines, save)


def _leakage_figures(result: dict[str, Any], cosines: list[Any], save: Any) -> None:
    """Leakage vs JS beside each cosine, and the KL asymmetry against leakage."""
    from divscope.report import persona_plots as pp

    lk = result["leakage"]
    for c in cosines:
        if c.key in lk["cosine"]:
            vals = [c.value(p["source"], p["target"]) for p in lk["directed_pairs"]]
            save(
                pp.leakage_side_by_side(lk, c.key, vals),
                "leakage_js_vs_" + c.key.replace("/", "_"),
            )
    save(pp.kl_asymmetry_vs_leakage(result["kl_asymmetry"]), "kl_asymmetry_vs_leakage")
