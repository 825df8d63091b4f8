"""``divscope personas``: teacher-forced JS/KL matrices between personas of one model."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from divscope.cli.common import POSITIVE, at_least, command, executor_options, index_list
from divscope.execution.executors import make_executor
from divscope.models.load import DTYPES
from divscope.report.tables import fmt


def add_parser(sub: Any) -> None:
    """Register ``personas`` and its options."""
    pe = command(sub, "personas", help="teacher-forced JS/KL matrices between personas")
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
        "--n-personas", type=at_least(2), default=None, help="the first K personas (default: all)"
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
        type=index_list,
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
        type=at_least(0),
        default=2,
        help="write token-level explanations of the N farthest pairs (0: none)",
    )
    pe.add_argument("--out", required=True, help="output directory")
    pe.add_argument("--overwrite", action="store_true", help="replace outputs in --out")
    pe.add_argument("--quiet", action="store_true", help="no progress bars")
    executor_options(pe)
    pe.add_argument(
        "--unit-responses",
        type=POSITIVE,
        default=None,
        metavar="K",
        help="answers per unit of work (default: all of a question's); smaller units keep "
        "more workers busy, the numbers do not change",
    )
    pe.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run the persona pipeline, write its outputs (and explanations), print the extremes."""
    from divscope import defaults
    from divscope.models.load import load_model
    from divscope.personas.data import load_personas, load_questions
    from divscope.personas.pipeline import (
        PersonaCheckError,
        check_generation,
        run_personas,
        write_outputs,
    )

    personas = load_personas(args.personas or defaults.PERSONAS, args.n_personas)
    questions = load_questions(args.questions or defaults.QUESTIONS, args.n_questions)
    gen = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature}
    gen |= {"top_p": args.top_p, "seed": args.seed}
    check_generation(len(personas), len(questions), gen, args.backend, noise_floor=True)
    layers = args.layers
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
        written["explain.json"] = _write_explanations(args, loaded, result)
    print(f"{len(result.names)} personas x {len(questions)} questions, model {args.model}; "
          "checks ok")  # fmt: skip
    _print_extremes(result.matrices["js"], result.names)
    print("wrote " + ", ".join(str(p) for p in written.values()))
    return 0


def _write_explanations(args: argparse.Namespace, loaded: Any, result: Any) -> Path:
    """Token-level explanations of the ``--explain-pairs`` farthest pairs -> explain.json."""
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
    return atomic_write_json(Path(args.out) / "explain.json", explanations, overwrite=True)


def _print_extremes(js: Any, names: list[str]) -> None:
    """The three farthest and the three closest persona pairs by JS."""
    n = len(names)
    pairs = sorted(
        ((js[a, b], names[a], names[b]) for a in range(n) for b in range(a + 1, n)),
        reverse=True,
    )
    for v, a, b in pairs[:3]:
        print(f"  farthest: {a} vs {b}: JS {fmt(v)} nats")
    for v, a, b in pairs[-3:][::-1]:
        print(f"  closest:  {a} vs {b}: JS {fmt(v)} nats")
