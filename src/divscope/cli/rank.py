"""``divscope rank``: rank prompts by how differently two models answer (two sample files)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from divscope.cli.common import POSITIVE, command
from divscope.estimators.ranking import ALL_METRICS, Ranking, rank_prompts
from divscope.report.tables import printable, ranking_table
from divscope.runmeta import atomic_write_json, check_writable
from divscope.samples.read import load_pair


def add_parser(sub: Any) -> None:
    """Register ``rank`` and its options."""
    r = command(sub, "rank", help="rank prompts by how differently two models answer")
    r.add_argument("file_a", help="samples of model A (.pkl, .json or .jsonl)")
    r.add_argument("file_b", help="samples of model B on the same prompts")
    r.add_argument(
        "--metric",
        choices=ALL_METRICS,
        metavar="METRIC",
        default=None,
        help=f"score to rank by: {', '.join(ALL_METRICS)} (default: the best the files support)",
    )
    r.add_argument(
        "--top", type=POSITIVE, default=None, help="show only the N most different (default: all)"
    )
    r.add_argument(
        "--max-prompts",
        type=POSITIVE,
        default=None,
        help="score only the first K prompts (default: all)",
    )
    r.add_argument("--json", default=None, help="also write the full result as JSON here")
    r.add_argument("--overwrite", action="store_true", help="allow --json to replace a file")
    r.add_argument(
        "--n-bootstrap",
        type=POSITIVE,
        default=1000,
        help="bootstrap resamples for legacy_aligned's CIs (default: 1000)",
    )
    r.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    r.set_defaults(func=run)


def format_ranking(r: Ranking, top: int | None = None) -> str:
    """The ranked table ``divscope rank`` prints."""
    m = r.metric
    lines = [
        f"models: A = {printable(r.models[0])}   B = {printable(r.models[1])}",
        f"metric: {m} ({r.units.get(m, '')}); {round(r.ci_level * 100)}% CI: {r.ci_method}",
    ]
    lines += [f"note: {printable(n)}" for n in r.notes]
    return "\n".join([*lines, "", ranking_table(r, top).text()])


def run(args: argparse.Namespace) -> int:
    """Score both files' prompts, print the table and (with --json) write the ranking."""
    if args.json:  # refused before any work, not after the table is computed and printed
        check_writable(Path(args.json), overwrite=args.overwrite)
    a, b = load_pair(args.file_a, args.file_b)
    ranking = rank_prompts(
        a,
        b,
        metric=args.metric,
        max_prompts=args.max_prompts,
        n_bootstrap=args.n_bootstrap,
        seed=args.seed,
    )
    print(format_ranking(ranking, args.top))
    if args.json:
        atomic_write_json(Path(args.json), ranking.to_json(), overwrite=args.overwrite)
        print(f"\nwrote {args.json}")
    return 0
