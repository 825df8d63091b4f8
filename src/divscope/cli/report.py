"""``divscope report``: a self-contained HTML (or Markdown) report of a run directory."""

from __future__ import annotations

import argparse
from typing import Any

from divscope.cli.common import command


def add_parser(sub: Any) -> None:
    """Register ``report`` and its options."""
    rp = command(sub, "report", help="a self-contained HTML (or Markdown) report of a run")
    rp.add_argument("run_dir", help="a ranking run (ranking.json) or a persona run directory")
    rp.add_argument("--out", default=None, help="output file (default RUN_DIR/report.html)")
    rp.add_argument(
        "--format", choices=("html", "md", "both"), default="html", help="report format"
    )
    rp.add_argument("--overwrite", action="store_true", help="replace an existing report")
    rp.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Build the report and print the files written."""
    from divscope.report.html import build_report

    for path in build_report(args.run_dir, args.out, args.format, overwrite=args.overwrite):
        print(f"wrote {path}")
    return 0
