"""The ``divscope`` command line: rank, sample, personas, diff, analyze, report, convert."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from divscope import __version__
from divscope.diff.conditions import DiffInputError
from divscope.estimators.ranking import ALL_METRICS, Ranking, rank_prompts
from divscope.execution.executors import ExecutorError, make_executor
from divscope.models.chat import TemplateSeamError
from divscope.models.load import ModelNotFoundError
from divscope.personas.data import PersonaDataError
from divscope.report.html import ReportError
from divscope.runmeta import atomic_write_json
from divscope.samples.errors import SampleFileError
from divscope.samples.read import load_pair, load_samples
from divscope.samples.write import write_samples_jsonl
from divscope.sampling.config import ConfigError
from divscope.stats.analysis import AnalysisInputError


def printable(s: str) -> str:
    """``s`` safe for a terminal: control characters (ESC, BEL, ...), lone surrogates and other
    non-printable characters shown as escapes (``\\x1b``), never sent raw."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in s)


def _short(s: str, n: int) -> str:
    s = printable(" ".join(s.split()))
    return s if len(s) <= n else s[: n - 1] + "…"


def format_ranking(r: Ranking, top: int | None = None) -> str:
    """The ranked table ``divscope rank`` prints."""
    m = r.metric
    lines = [
        f"models: A = {printable(r.models[0])}   B = {printable(r.models[1])}",
        f"metric: {m} ({r.units.get(m, '')}); {int(r.ci_level * 100)}% bootstrap CI over "
        f"responses, {r.n_bootstrap} resamples",
    ]
    lines += [f"note: {printable(n)}" for n in r.notes]
    header = f"{'rank':>4} {'idx':>4} {m:>12} {'ci':>19} {'n_a':>4} {'n_b':>4} {'excl':>5}  prompt"
    lines += ["", header, "-" * len(header)]
    ordered = sorted(r.prompts, key=lambda p: (p.rank is None, p.rank or 0, p.index))
    shown = [p for p in ordered if p.rank is not None][: top or None]
    shown += [p for p in ordered if p.rank is None]
    for p in shown:
        v = p.scores.get(m)
        ci = p.ci.get(m)
        ci_s = f"[{ci[0]:.4f}, {ci[1]:.4f}]" if ci else "-"
        v_s = f"{v:.4f}" if v is not None else "-"
        rank = str(p.rank) if p.rank is not None else "-"
        excl = f"{p.excluded_responses[0]}/{p.excluded_responses[1]}"
        text = (
            _short(p.prompt, 60) if p.rank is not None else f"({p.reason}) {_short(p.prompt, 40)}"
        )
        lines.append(
            f"{rank:>4} {p.index:>4} {v_s:>12} {ci_s:>19} {p.n_responses[0]:>4} "
            f"{p.n_responses[1]:>4} {excl:>5}  {text}"
        )
    return "\n".join(lines)


def _cmd_rank(args: argparse.Namespace) -> int:
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
    samples = load_samples(args.input)
    if Path(args.output).suffix.lower() == ".npz":
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
    from divscope.personas.data import load_personas, load_questions
    from divscope.personas.pipeline import PersonaCheckError, run_personas, write_outputs

    personas = load_personas(args.personas, args.n_personas)
    questions = load_questions(args.questions, args.n_questions)
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
            *loaded, result.records, result.names, result.matrices["js"], n_pairs=args.explain_pairs
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
        print(f"  farthest: {a} vs {b}: JS {v:.4f} nats")
    for v, a, b in pairs[-3:][::-1]:
        print(f"  closest:  {a} vs {b}: JS {v:.4f} nats")
    print("wrote " + ", ".join(str(p) for p in written.values()))
    return 0


def _cmd_diff(args: argparse.Namespace) -> int:
    from divscope.diff.conditions import parse_spec
    from divscope.diff.outputs import FILES, write_outputs
    from divscope.diff.pipeline import read_prompts, run_diff

    a = parse_spec(args.a, args.system_a, args.dtype)
    b = parse_spec(args.b, args.system_b, args.dtype)
    prompts = read_prompts(args.prompts, args.max_prompts)
    out = Path(args.out)
    clash = [f for f in FILES if (out / f).exists()]
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
        ci = p.ci.get(m) or [float("nan")] * 2
        print(f"  #{p.rank}: {m} {p.scores[m]:.4g} [{ci[0]:.4g}, {ci[1]:.4g}] {unit}  "
              f"{_short(p.prompt, 60)}")  # fmt: skip
    s = result.summary.get("on_a_samples")
    if s:
        print(
            f"  on A's samples: KL(A||B) {s['kl_mean']:.4g} +- {s['kl_se'] or 0:.2g} nats/token, "
            f"same top token {s['same_top_rate']:.1%}, "
            f"ln(PPL_B/PPL_A) {s['ln_ppl_ratio_b_over_a']:.4g}"
        )
    print("wrote " + ", ".join(str(p) for p in written.values()))
    return 0


def _cmd_analyze(args: argparse.Namespace) -> int:
    if not args.overwrite:  # nothing computed or written when an output would be replaced
        if args.json and Path(args.json).exists():
            raise FileExistsError(f"{args.json} exists")
        if args.figures and list(Path(args.figures).glob("*.png")):
            raise FileExistsError(f"{args.figures} already holds figures")

    from divscope.stats import analysis as stats

    matrices = stats.load_matrices(args.matrices)
    cosines = [c for f in args.cosine for c in stats.load_cosine(f)]
    leakage = stats.load_leakage(args.leakage) if args.leakage else None
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
    d = result["discrimination"]
    print(
        f"discrimination: JS mean {d['mean']:.4f}, std {d['std']:.4f} (gate > "
        f"{d['thresholds']['std']}: {'pass' if d['pass_std'] else 'FAIL'}), ratio "
        f"{d['ratio']:.2f} (gate > {d['thresholds']['ratio']}: "
        f"{'pass' if d['pass_ratio'] else 'FAIL'}) -> {'PASS' if d['pass'] else 'FAIL'}"
    )
    for k, v in result["redundancy"].items():
        print(
            f"redundancy JS vs {k}: rho {v['spearman_rho']:.3f}, Mantel p {v['mantel_p']:.4g}"
            f"{' (redundant)' if v['redundant'] else ''}"
        )
    if "leakage" in result:
        lk = result["leakage"]
        print(
            f"leakage ({lk['n_pairs']} directed pairs): JS rho {lk['js_spearman_rho']:.3f} "
            f"(p {lk['js_spearman_p']:.2g})"
        )
        for k, v in lk["cosine"].items():
            cmp = v.get("comparison") or {}
            print(
                f"  cosine {k}: rho {v['spearman_rho']:.3f}; |rho_JS| - rho_cos = "
                f"{cmp.get('difference', float('nan')):.3f}, MRR z {cmp.get('statistic', 0):.2f}"
                f", p {cmp.get('p', float('nan')):.3g}"
            )
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


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text}: must be at least 1")
    return value


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
        type=int,
        default=1,
        help="Ray workers, each with its own copy of the model: one GPU each with --device "
        "cuda, else an equal share of the CPUs (1)",
    )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for the docs and the tests)."""
    p = argparse.ArgumentParser(prog="divscope", description=__doc__)
    p.add_argument("--version", action="version", version=f"divscope {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("rank", help="rank prompts by how differently two models answer")
    r.add_argument("file_a", help="samples of model A (.pkl, .json or .jsonl)")
    r.add_argument("file_b", help="samples of model B on the same prompts")
    r.add_argument(
        "--metric",
        choices=ALL_METRICS,
        default=None,
        help="score to rank by (default: the best the files support)",
    )
    r.add_argument("--top", type=int, default=None, help="show only the N most different")
    r.add_argument("--max-prompts", type=int, default=None, help="score only the first K prompts")
    r.add_argument("--json", default=None, help="also write the full result as JSON here")
    r.add_argument("--overwrite", action="store_true", help="allow --json to replace a file")
    r.add_argument("--n-bootstrap", type=int, default=1000, help="bootstrap resamples for CIs")
    r.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    r.set_defaults(func=_cmd_rank)

    s = sub.add_parser("sample", help="sample responses with logprobs (and cross-score them)")
    s.add_argument("--config", required=True, help="YAML config (see experiments/configs/)")
    s.add_argument(
        "--new",
        action="store_true",
        help="start a fresh run instead of resuming the last run of this config",
    )
    s.add_argument("--run-dir", default=None, help="write to (or resume) this directory")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=_cmd_sample)

    pe = sub.add_parser("personas", help="teacher-forced JS/KL matrices between personas")
    pe.add_argument(
        "--model",
        default="smollm2-135m-instruct",
        help="hub name, local path, or smollm2-135m-instruct / gemma3-270m",
    )
    pe.add_argument("--personas", default="data/personas/core.yaml")
    pe.add_argument("--questions", default="data/questions/eval20.yaml")
    pe.add_argument("--n-personas", type=int, default=None, help="the first K personas")
    pe.add_argument("--n-questions", type=int, default=None, help="the first Q questions")
    pe.add_argument("--max-new-tokens", type=int, default=48)
    pe.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    pe.add_argument("--top-p", type=float, default=1.0)
    pe.add_argument("--seed", type=int, default=0)
    pe.add_argument(
        "--layers",
        default=None,
        help="comma-separated hidden_states indices (default: 4 evenly spaced)",
    )
    pe.add_argument("--backend", choices=("hf", "vllm"), default="hf")
    pe.add_argument("--device", default="cpu", help="cpu or cuda")
    pe.add_argument("--dtype", default="float32", help="float32 or bfloat16")
    pe.add_argument(
        "--explain-pairs",
        type=int,
        default=2,
        help="write token-level explanations of the N farthest pairs (0: none)",
    )
    pe.add_argument("--out", required=True, help="output directory")
    pe.add_argument("--overwrite", action="store_true", help="replace outputs in --out")
    pe.add_argument("--quiet", action="store_true", help="no progress bars")
    _executor_options(pe)
    pe.add_argument(
        "--unit-responses",
        type=_positive,
        default=None,
        metavar="K",
        help="answers per unit of work (default: all of a question's); smaller units keep "
        "more workers busy, the numbers do not change",
    )
    pe.set_defaults(func=_cmd_personas)

    d = sub.add_parser(
        "diff",
        help="exact KL/JS between two local models (base vs fine-tuned or quantized)",
        description="Sample from two conditions, teacher-force every response under both, "
        "exact full-vocabulary KL both ways and JS at every position; prompts ranked with CIs. "
        "SPEC: MODEL[,adapter=DIR][,dtype=DTYPE], MODEL a packaged name "
        "(smollm2-135m-instruct, gemma3-270m), a local directory or a hub name.",
    )
    d.add_argument("--a", required=True, metavar="SPEC", help="condition A (the base)")
    d.add_argument("--b", required=True, metavar="SPEC", help="condition B (the variant)")
    d.add_argument("--prompts", required=True, help="JSONL with prompt (and category) per line")
    d.add_argument("--samples", type=int, default=4, help="responses per prompt and side (4)")
    d.add_argument("--max-new-tokens", type=int, default=48, help="tokens per response (48)")
    d.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (1.0)")
    d.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (1.0)")
    d.add_argument("--seed", type=int, default=0, help="sampling and bootstrap seed (0)")
    d.add_argument("--system-a", default=None, help="system prompt of A (none)")
    d.add_argument("--system-b", default=None, help="system prompt of B (none)")
    d.add_argument(
        "--metric",
        default=None,
        help="rank by kl, kl_ab, kl_ba, js, js_ab, js_ba, mc_kl, mc_kl_ab or mc_kl_ba (default: "
        "kl; mc_kl per byte when the tokenizers differ)",
    )
    d.add_argument("--n-bootstrap", type=int, default=1000, help="bootstrap resamples (1000)")
    d.add_argument("--max-prompts", type=int, default=None, help="the first K prompts")
    d.add_argument("--backend", choices=("hf", "vllm"), default="hf", help="generation (hf)")
    d.add_argument("--device", default="cpu", help="cpu or cuda (cpu)")
    d.add_argument("--dtype", default="float32", help="default dtype of both specs (float32)")
    d.add_argument("--out", required=True, help="output directory")
    d.add_argument("--overwrite", action="store_true", help="replace outputs in --out")
    d.add_argument("--quiet", action="store_true", help="no progress bars")
    _executor_options(d)
    d.set_defaults(func=_cmd_diff)

    a = sub.add_parser("analyze", help="statistics: JS vs cosine vs leakage")
    a.add_argument("--matrices", required=True, help="divergence_matrices.json")
    a.add_argument("--cosine", action="append", default=[], help="cosine file (repeatable)")
    a.add_argument("--leakage", default=None, help="leakage CSV, marker_eval file or directory")
    a.add_argument("--json", default=None, help="write the analysis here")
    a.add_argument("--figures", default=None, help="write figures into this directory")
    a.add_argument(
        "--overwrite", action="store_true", help="allow replacing --json and --figures outputs"
    )
    a.add_argument("--std-threshold", type=float, default=0.05, help="discrimination gate")
    a.add_argument("--ratio-threshold", type=float, default=3.0, help="discrimination gate")
    a.add_argument("--n-permutations", type=int, default=9999, help="Mantel permutations")
    a.add_argument("--n-bootstrap", type=int, default=2000, help="bootstrap resamples")
    a.add_argument("--seed", type=int, default=0)
    a.set_defaults(func=_cmd_analyze)

    rp = sub.add_parser("report", help="a self-contained HTML (or Markdown) report of a run")
    rp.add_argument("run_dir", help="a ranking run (ranking.json) or a persona run directory")
    rp.add_argument("--out", default=None, help="output file (default RUN_DIR/report.html)")
    rp.add_argument("--format", choices=("html", "md", "both"), default="html")
    rp.add_argument("--overwrite", action="store_true", help="replace an existing report")
    rp.set_defaults(func=_cmd_report)

    c = sub.add_parser(
        "convert",
        help="convert a sample file to divscope JSONL, or to the packed .npz that loads fast",
    )
    c.add_argument("input")
    c.add_argument("output", help="OUTPUT.jsonl (JSONL) or OUTPUT.npz (packed arrays)")
    c.add_argument("--overwrite", action="store_true", help="allow replacing OUTPUT")
    c.set_defaults(func=_cmd_convert)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``divscope`` console script; returns the exit code."""
    args = build_parser().parse_args(argv)
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


if __name__ == "__main__":
    sys.exit(main())
