"""``divscope sample``: sample responses with logprobs from API servers (a YAML config)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from divscope.cli.common import command


def add_parser(sub: Any) -> None:
    """Register ``sample`` and its options."""
    s = command(sub, "sample", help="sample responses with logprobs (and cross-score them)")
    s.add_argument("--config", required=True, help="YAML config (see experiments/configs/)")
    s.add_argument(
        "--new",
        action="store_true",
        help="start a fresh run instead of resuming the last run of this config",
    )
    s.add_argument("--run-dir", default=None, help="write to (or resume) this directory")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run (or resume) the sampling run; exit 1 when prompts are left to do."""
    from divscope.sampling.config import load_config
    from divscope.sampling.sampler import Sampler

    config = load_config(args.config)
    summary = Sampler(config, progress=not args.quiet).run(
        Path(args.run_dir) if args.run_dir else None, new=args.new
    )
    print("\n".join(summary.lines()))
    return 0 if summary.complete else 1
