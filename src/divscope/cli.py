"""The ``divscope`` command line: rank, sample, personas, diff, analyze, report, convert."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from divscope import __version__
from divscope.diff.conditions import DiffInputError
from divscope.estimators.ranking import ALL_METRICS, Ranking, rank_prompts
from divscope.execution.executors import ExecutorError, make_executor
from divscope.models.chat import TemplateSeamError
from divscope.models.load import DTYPES, DeviceError, ModelNotFoundError
from divscope.personas.data import PersonaDataError
from divscope.report.html import ReportError
from divscope.report.tables import (
    analysis_summary,
    fmt,
    fmt_ci,
    printable,
    ranking_table,
    shorten,
)
from divscope.runmeta import OutputError, atomic_write_json, check_writable, output_error
from divscope.samples.errors import SampleFileError
from divscope.samples.read import load_pair, load_samples
from divscope.samples.write import write_samples_jsonl
from divscope.sampling.config import ConfigError
from divscope.stats.analysis import AnalysisInputError

DESCRIPTION = (
    "divscope: where do language-model output distributions differ? KL and JS between two "
    "models (ranked prompts) and between personas of one model, with the statistics and "
    "reports around them. Run 'divscope COMMAND --help' for a command's options."
)


def format_ranking(r: Ranking, top: int | None = None) -> str:
    """The ranked table ``divscope rank`` prints."""
    m = r.metric
    lines = [
        f"models: A = {printable(r.models[0])}   B = {printable(r.models[1])}",
        f"metric: {m} ({r.units.get(m, '')}); {round(r.ci_level * 100)}% CI: {r.ci_method}",
    ]
    lines += [f"note: {printable(n)}" for n in r.notes]
    return "\n".join([*lines, "", ranking_table(r, top).text()])


def _cmd_rank(args: argparse.Namespace) -> int:
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


def _cmd_convert(args: argparse.Namespace) -> int:
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


def _cmd_sample(args: argparse.Namespace) -> int:
    from divscope.sampling.config import load_config
    from divscope.sampling.sampler import Sampler

    config = load_config(args.config)
    summary = Sampler(config, progress=not args.quiet).run(
        Path(args.run_dir) if args.run_dir else None, new=args.new
    )
    print("\n".join(summary.lines()))
    return 0 if summary.complete else 1


def _cmd_personas(args: argparse.Namespace) -> int:
    from divscope import defaults
    from divscope.personas.data import load_personas, load_questions
    from divscope.personas.pipeline import PersonaCheckError, run_personas, write_outputs

    personas = load_personas(args.personas or defaults.PERSONAS, args.n_personas)
    questions = load_questions(args.questions or defaults.QUESTIONS, args.n_questions)
    layers = [int(x) for x in args.layers.split(",")] if args.layers else None
    from divscope.models.load import load_model

    executor = make_executor(args.ray, args.workers, device=args.device)
    # with Ray the workers load the model; here only to explain pairs afterwards
    want = not executor.remote or args.explain_pairs
    loaded = load_model(args.model, device=args.device, dtype=args.dtype) if want else None
    try:
        result = run_personas(
            args.model,
            personas,
            questions,
            loaded=loaded,
            executor=executor,
            responses_per_unit=args.unit_responses,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            seed=args.seed,
            layers=layers,
            backend=args.backend,
            device=args.device,
            dtype=args.dtype,
            progress=not args.quiet,
        )
    except PersonaCheckError as e:
        write_outputs(e.result, args.out, overwrite=args.overwrite)  # type: ignore[attr-defined]
        print(
            f"divscope: error: {e}; outputs written to {args.out} for inspection", file=sys.stderr
        )
        return 3
    finally:
        executor.close()
    written = write_outputs(result, args.out, overwrite=args.overwrite)
    if args.explain_pairs and loaded is not None:
        from divscope.personas.explain import explain_run
        from divscope.runmeta import atomic_write_json

        explanations = explain_run(
            *loaded,
            result.records,
            result.names,
            result.matrices["js"],
            n_pairs=args.explain_pairs,
            cache=result.cache,
        )
        written["explain.json"] = atomic_write_json(
            Path(args.out) / "explain.json", explanations, overwrite=True
        )
    js = result.matrices["js"]
    n = len(result.names)
    pairs = sorted(
        ((js[a, b], result.names[a], result.names[b]) for a in range(n) for b in range(a + 1, n)),
        reverse=True,
    )
    print(f"{n} personas x {len(questions)} questions, model {args.model}; checks ok")
    for v, a, b in pairs[:3]:
        print(f"  farthest: {a} vs {b}: JS {fmt(v)} nats")
    for v, a, b in pairs[-3:][::-1]:
        print(f"  closest:  {a} vs {b}: JS {fmt(v)} nats")
    print("wrote " + ", ".join(str(p) for p in written.values()))
    return 0


def _cmd_diff(args: argparse.Namespace) -> int:
    from divscope.diff.conditions import parse_spec
    from divscope.diff.outputs import FILES, write_outputs
    from divscope.diff.pipeline import read_prompts, run_diff

    a = parse_spec(args.a, args.system_a, args.dtype)
    b = parse_spec(args.b, args.system_b, args.dtype)
    from divscope import defaults

    prompts = read_prompts(args.prompts or defaults.PROMPTS, args.max_prompts)
    out = Path(args.out)
    names = FILES + (("layers.json",) if args.layers else ())
    clash = [f for f in names if (out / f).exists()]
    if clash and not args.overwrite:
        raise FileExistsError(f"{out} already holds {clash}")
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
        )
    finally:
        executor.close()
    written = write_outputs(result, out, overwrite=args.overwrite)
    r = result.ranking
    m, unit = r.metric, r.units[r.metric]
    print(f"{a.label} vs {b.label}: {len(prompts)} prompts x {args.samples} samples per side")
    for note in r.notes[:1] if not result.units else []:
        print(f"  note: {note}")
    for p in sorted((p for p in r.prompts if p.rank is not None), key=lambda p: p.rank)[:5]:
        print(f"  #{p.rank}: {m} {fmt(p.scores[m])} {fmt_ci(p.ci.get(m))} {unit}  "
              f"{shorten(p.prompt, 60)}")  # fmt: skip
    s = result.summary.get("on_a_samples")
    if s:
        print(
            f"  on A's samples: KL(A||B) {s['kl_mean']:.4g} +- {s['kl_se'] or 0:.2g} nats/token, "
            f"same top token {s['same_top_rate']:.1%}, "
            f"ln(PPL_B/PPL_A) {s['ln_ppl_ratio_b_over_a']:.4g}"
        )
    for line in (result.layers or {}).get("sentences", []):
        print(f"  {line}")
    print("wrote " + ", ".join(str(p) for p in written.values()))
    return 0


def _cmd_analyze(args: argparse.Namespace) -> int:
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
        _analysis_figures(matrices, cosines, result, Path(args.figures))
        print(f"figures in {args.figures}")
    return 0


def _analysis_figures(matrices, cosines, result, out: Path) -> None:  # noqa: ANN001
    import matplotlib.pyplot as plt

    from divscope.report import persona_plots as pp

    out.mkdir(parents=True, exist_ok=True)

    def save(fig, name: str) -> None:  # noqa: ANN001
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
        lk = result["leakage"]
        for c in cosines:
            if c.key in lk["cosine"]:
                vals = [c.value(p["source"], p["target"]) for p in lk["directed_pairs"]]
                save(
                    pp.leakage_side_by_side(lk, c.key, vals),
                    "leakage_js_vs_" + c.key.replace("/", "_"),
                )
        save(pp.kl_asymmetry_vs_leakage(result["kl_asymmetry"]), "kl_asymmetry_vs_leakage")


def _cmd_report(args: argparse.Namespace) -> int:
    from divscope.report.html import build_report

    for path in build_report(args.run_dir, args.out, args.format, overwrite=args.overwrite):
        print(f"wrote {path}")
    return 0


class _Formatter(argparse.HelpFormatter):
    """Help with each option's default, unless it has none or the help text gives it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if default is None or default is False or default == argparse.SUPPRESS:
            return text
        if "default" in text or not text:
            return text
        return f"{text} (default: {default})"


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _Formatter)
        super().__init__(*args, **kwargs)


def _at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer >= ``minimum`` (anything else is refused with a message)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum} (got {value})")
        return value

    parse.__name__ = f"integer >= {minimum}"
    return parse


POSITIVE = _at_least(1)


def _command(sub: Any, name: str, help: str, **kwargs: Any) -> argparse.ArgumentParser:  # noqa: A002
    """A subcommand whose ``--help`` opens with its one-line summary (unless it has more)."""
    kwargs.setdefault("description", help[0].upper() + help[1:] + ".")
    return sub.add_parser(name, help=help, **kwargs)


def _executor_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--ray",
        nargs="?",
        const="local",
        default=None,
        metavar="ADDRESS",
        help="run generation and scoring on Ray workers: a local Ray instance (no ADDRESS) or "
        "the cluster at ADDRESS (host:6379, ray://host:10001, auto); default: in this process",
    )
    p.add_argument(
        "--workers",
        type=POSITIVE,
        default=1,
        help="Ray workers, each with its own copy of the model: one GPU each with --device "
        "cuda, else an equal share of the CPUs",
    )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for the docs and the tests)."""
    p = _Parser(prog="divscope", description=DESCRIPTION)
    p.add_argument("--version", action="version", version=f"divscope {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)

    r = _command(sub, "rank", help="rank prompts by how differently two models answer")
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
    r.set_defaults(func=_cmd_rank)

    s = _command(sub, "sample", help="sample responses with logprobs (and cross-score them)")
    s.add_argument("--config", required=True, help="YAML config (see experiments/configs/)")
    s.add_argument(
        "--new",
        action="store_true",
        help="start a fresh run instead of resuming the last run of this config",
    )
    s.add_argument("--run-dir", default=None, help="write to (or resume) this directory")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=_cmd_sample)

    pe = _command(sub, "personas", help="teacher-forced JS/KL matrices between personas")
    pe.add_argument(
        "--model",
        default="smollm2-135m-instruct",
        help="hub name, local path, or smollm2-135m-instruct / gemma3-270m",
    )
    pe.add_argument(
        "--personas",
        default=None,
        help="YAML with personas: [{name, prompt}] (default: the 12 that ship with divscope)",
    )
    pe.add_argument(
        "--questions",
        default=None,
        help="YAML with questions: [{id, text, category}] (default: the 20 that ship with "
        "divscope)",
    )
    pe.add_argument(
        "--n-personas", type=_at_least(2), default=None, help="the first K personas (default: all)"
    )
    pe.add_argument(
        "--n-questions", type=POSITIVE, default=None, help="the first Q questions (default: all)"
    )
    pe.add_argument("--max-new-tokens", type=POSITIVE, default=48, help="tokens per answer")
    pe.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    pe.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling")
    pe.add_argument("--seed", type=int, default=0, help="sampling seed")
    pe.add_argument(
        "--layers",
        default=None,
        help="comma-separated hidden_states indices (default: 4 evenly spaced)",
    )
    pe.add_argument(
        "--backend", choices=("hf", "vllm"), default="hf", help="generation: transformers or vLLM"
    )
    pe.add_argument("--device", default="cpu", help="cpu or cuda")
    pe.add_argument("--dtype", default="float32", choices=DTYPES, help="model weights")
    pe.add_argument(
        "--explain-pairs",
        type=_at_least(0),
        default=2,
        help="write token-level explanations of the N farthest pairs (0: none)",
    )
    pe.add_argument("--out", required=True, help="output directory")
    pe.add_argument("--overwrite", action="store_true", help="replace outputs in --out")
    pe.add_argument("--quiet", action="store_true", help="no progress bars")
    _executor_options(pe)
    pe.add_argument(
        "--unit-responses",
        type=POSITIVE,
        default=None,
        metavar="K",
        help="answers per unit of work (default: all of a question's); smaller units keep "
        "more workers busy, the numbers do not change",
    )
    pe.set_defaults(func=_cmd_personas)

    d = _command(
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
    _executor_options(d)
    d.set_defaults(func=_cmd_diff)

    a = _command(sub, "analyze", help="statistics: JS vs cosine vs leakage")
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
    a.set_defaults(func=_cmd_analyze)

    rp = _command(sub, "report", help="a self-contained HTML (or Markdown) report of a run")
    rp.add_argument("run_dir", help="a ranking run (ranking.json) or a persona run directory")
    rp.add_argument("--out", default=None, help="output file (default RUN_DIR/report.html)")
    rp.add_argument(
        "--format", choices=("html", "md", "both"), default="html", help="report format"
    )
    rp.add_argument("--overwrite", action="store_true", help="replace an existing report")
    rp.set_defaults(func=_cmd_report)

    c = _command(
        sub,
        "convert",
        help="convert a sample file to divscope JSONL, or to the packed .npz that loads fast",
    )
    c.add_argument("input", help="a sample file (.pkl, .json, .jsonl or .npz)")
    c.add_argument("output", help="OUTPUT.jsonl (JSONL) or OUTPUT.npz (packed arrays)")
    c.add_argument("--overwrite", action="store_true", help="allow replacing OUTPUT")
    c.set_defaults(func=_cmd_convert)
    return p


def _no_library_progress_bars() -> None:
    """--quiet: transformers' "Loading weights" and the hub's download bars stay hidden too."""
    from huggingface_hub.utils import disable_progress_bars
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    disable_progress_bars()


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``divscope`` console script; returns the exit code."""
    args = build_parser().parse_args(argv)
    if getattr(args, "quiet", False):
        _no_library_progress_bars()
    try:
        return args.func(args)
    except SampleFileError as e:
        print(f"divscope: error: {e}", file=sys.stderr)
        return 2
    except (
        ConfigError,
        PersonaDataError,
        TemplateSeamError,
        AnalysisInputError,
        ReportError,
        DiffInputError,
        ModelNotFoundError,
        DeviceError,
        ExecutorError,
    ) as e:
        print(f"divscope: error: {e}", file=sys.stderr)
        return 2
    except ConnectionError as e:  # ray.init could not reach --ray ADDRESS
        print(f"divscope: error: {e}. Fix: check --ray ADDRESS", file=sys.stderr)
        return 2
    except FileExistsError as e:
        print(f"divscope: error: {e}; pass --overwrite to replace it", file=sys.stderr)
        return 2
    except OutputError as e:
        print(f"divscope: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # writing a run directory or an output: one line, not a traceback
        print(f"divscope: error: {output_error(None, e)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
