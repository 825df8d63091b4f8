"""``divscope diff``: exact KL/JS between two local models, prompts ranked with CIs."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from divscope.cli.common import POSITIVE, command, executor_options
from divscope.diff.conditions import DiffInputError
from divscope.diff.layer_options import N_CAUSAL, N_RANDOM, parse_causal_blocks
from divscope.execution.executors import make_executor
from divscope.models.load import DTYPES
from divscope.report.tables import fmt, fmt_ci, shorten


def add_parser(sub: Any) -> None:
    """Register ``diff`` and its options."""
    d = command(
        sub,
        "diff",
        help="exact KL/JS between two local models (base vs fine-tuned or quantized)",
        description="Sample from two conditions, teacher-force every response under both, "
        "exact full-vocabulary KL both ways and JS at every position; prompts ranked with CIs. "
        "SPEC: MODEL[,adapter=DIR][,dtype=DTYPE], MODEL a packaged name "
        "(smollm2-135m-instruct, gemma3-270m), a local directory or a hub name.",
    )
    d.add_argument("--a", required=True, metavar="SPEC", help="condition A (the base)")
    d.add_argument("--b", required=True, metavar="SPEC", help="condition B (the variant)")
    d.add_argument(
        "--prompts",
        default=None,
        help="JSONL with prompt (and category) per line (default: the 72 prompts that ship "
        "with divscope)",
    )
    d.add_argument("--samples", type=POSITIVE, default=4, help="responses per prompt and side")
    d.add_argument("--max-new-tokens", type=POSITIVE, default=48, help="tokens per response")
    d.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    d.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling")
    d.add_argument("--seed", type=int, default=0, help="sampling and bootstrap seed")
    d.add_argument("--system-a", default=None, help="system prompt of A (default: none)")
    d.add_argument("--system-b", default=None, help="system prompt of B (default: none)")
    d.add_argument(
        "--metric",
        default=None,
        help="rank by kl, kl_ab, kl_ba, js, js_ab, js_ba, mc_kl, mc_kl_ab or mc_kl_ba (default: "
        "kl; mc_kl per byte when the tokenizers differ)",
    )
    d.add_argument("--n-bootstrap", type=POSITIVE, default=1000, help="bootstrap resamples")
    d.add_argument(
        "--max-prompts", type=POSITIVE, default=None, help="the first K prompts (default: all)"
    )
    d.add_argument(
        "--backend", choices=("hf", "vllm"), default="hf", help="generation: transformers or vLLM"
    )
    d.add_argument("--device", default="cpu", help="cpu or cuda")
    d.add_argument(
        "--dtype", default="float32", choices=DTYPES, help="dtype of both specs unless they say"
    )
    d.add_argument("--out", required=True, help="output directory")
    d.add_argument("--overwrite", action="store_true", help="replace outputs in --out")
    d.add_argument("--quiet", action="store_true", help="no progress bars")
    d.add_argument(
        "--layers",
        action="store_true",
        help="also decompose KL(A||B) over the embeddings, each block and the head, with "
        "drift and each block's named direction (layers.json; same architecture and "
        "tokenizer, different weights, one system prompt)",
    )
    d.add_argument(
        "--causal-blocks",
        default=None,
        metavar="N",
        help=f"with --layers: the N leading blocks whose mean change gets the causal check "
        f"against {N_RANDOM} random directions, or 'all' (default {N_CAUSAL}; each block "
        f"costs {N_RANDOM + 1} runs of the blocks above it)",
    )
    executor_options(d)
    d.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Check the inputs, run the diff, write its outputs and print the top prompts."""
    from divscope.diff.outputs import output_dir

    with output_dir(args.out, overwrite=args.overwrite):  # refused at once if busy or a file
        return _run_locked(args)


def _run_locked(args: argparse.Namespace) -> int:
    from divscope import defaults
    from divscope.diff.conditions import parse_spec
    from divscope.diff.outputs import write_outputs
    from divscope.diff.pipeline import read_prompts, run_diff

    a = parse_spec(args.a, args.system_a, args.dtype)
    b = parse_spec(args.b, args.system_b, args.dtype)
    prompts = read_prompts(args.prompts or defaults.PROMPTS, args.max_prompts)
    causal = N_CAUSAL
    if args.causal_blocks is not None:
        if not args.layers:
            raise DiffInputError("--causal-blocks applies to --layers. Fix: add --layers")
        causal = parse_causal_blocks(args.causal_blocks)
    out = Path(args.out)
    executor = make_executor(args.ray, args.workers, device=args.device)
    try:
        result = run_diff(
            a,
            b,
            prompts,
            samples=args.samples,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            seed=args.seed,
            metric=args.metric,
            n_bootstrap=args.n_bootstrap,
            backend=args.backend,
            device=args.device,
            progress=not args.quiet,
            executor=executor,
            layers=args.layers,
            causal_blocks=causal,
        )
    finally:
        executor.close()
    written = write_outputs(result, out, overwrite=args.overwrite)
    print(f"{a.label} vs {b.label}: {len(prompts)} prompts x {args.samples} samples per side")
    _print_summary(result)
    for line in (result.layers or {}).get("sentences", []):
        print(f"  {line}")
    print("wrote " + ", ".join(str(p) for p in written.values()))
    return 0


def _print_summary(result: Any) -> None:
    """The five most different prompts and the summary on A's samples."""
    r = result.ranking
    m, unit = r.metric, r.units[r.metric]
    for note in r.notes[:1] if not result.units else []:
        print(f"  note: {note}")
    for p in sorted((p for p in r.prompts if p.rank is not None), key=lambda p: p.rank)[:5]:
        print(f"  #{p.rank}: {m} {fmt(p.scores[m])} {fmt_ci(p.ci.get(m))} {unit}  "
              f"{shorten(p.prompt, 60)}")  # fmt: skip
    s = result.summary.get("on_a_samples")
    if s:
        from divscope.diff.aggregate import summary_line

        print(f"  on A's samples: {summary_line(s, len(r.prompts))}")
