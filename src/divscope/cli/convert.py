"""``divscope convert``: a sample file to divscope JSONL or the packed ``.npz``."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from divscope.cli.common import command
from divscope.runmeta import check_writable
from divscope.samples.errors import SampleFileError
from divscope.samples.read import load_samples
from divscope.samples.write import write_samples_jsonl


def add_parser(sub: Any) -> None:
    """Register ``convert`` and its options."""
    c = command(
        sub,
        "convert",
        help="convert a sample file to divscope JSONL, or to the packed .npz that loads fast",
    )
    c.add_argument("input", help="a sample file (.pkl, .json, .jsonl or .npz)")
    c.add_argument("output", help="OUTPUT.jsonl (JSONL) or OUTPUT.npz (packed arrays)")
    c.add_argument("--overwrite", action="store_true", help="allow replacing OUTPUT")
    c.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Read the input and write it in the format the output's extension names."""
    suffix = Path(args.output).suffix.lower()
    if suffix not in (".jsonl", ".npz"):  # checked before the input is read
        raise SampleFileError(
            args.output,
            f"the output format follows the extension, and {suffix or 'no extension'} is none "
            "of .jsonl (divscope JSONL) or .npz (packed arrays)",
            f"name it {Path(args.output).with_suffix('.jsonl')} or "
            f"{Path(args.output).with_suffix('.npz')}",
        )
    check_writable(Path(args.output), overwrite=args.overwrite)
    samples = load_samples(args.input)
    if suffix == ".npz":
        from divscope.samples.packed import write_samples_packed

        out = write_samples_packed(samples, args.output, overwrite=args.overwrite)
    else:
        out = write_samples_jsonl(samples, args.output, overwrite=args.overwrite)
    n = sum(len(r.responses) for r in samples.records)
    print(f"wrote {out}: {len(samples.records)} prompts, {n} responses ({samples.model})")
    return 0
