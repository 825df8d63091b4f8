"""Model diff: divscope's exact scorer against a naive baseline, on the shipped pair.

The pair: SmolLM2-135M-Instruct (packaged) and the same model with the pirate LoRA adapter
(data/adapters/smollm2-pirate-lora, merged), fp32. Workload: P real prompts (rendered with the
chat template), S responses per prompt and side of T tokens each (random ids: the cost of
teacher forcing does not depend on the content), every response scored under both models.
Two paths, same numbers:

* naive (written here): one forward per (response, model) over prompt + response, logits for
  every position, ``torch.log_softmax``, then per-position KL both ways and JS;
* divscope: :func:`divscope.diff.score.score_prompt_pair` per prompt (each model's prompt runs
  once, responses 8 per forward against the cached prompt, output heads only at response
  positions in fp32 chunks, fused divergence, top-20 and "what changed" sums on the way).

Reported: seconds, FLOP/s (2 x non-embedding parameters x tokens run + 2 x hidden x vocab x
scored positions, both models) as a fraction of a matmul peak measured in the same run, the
speed-up, the max abs difference of per-position KL/JS, and the peak extra memory (RSS) of
the scorer at two workload sizes (it must not grow with prompts or samples).
"""

from __future__ import annotations

import argparse
import copy
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.bench_teacher_force import flops, matmul_peak
from benchmarks.common import PeakRSS, machine_info, write_result
from divscope.diff.conditions import load_condition, parse_spec
from divscope.diff.pipeline import read_prompts
from divscope.diff.score import PromptPair, score_prompt_pair
from divscope.models.chat import PromptRenderer

PAIR = ("smollm2-135m-instruct", "smollm2-135m-instruct,adapter=data/adapters/smollm2-pirate-lora")
HEADLINE = (4, 8, 64)  # prompts, samples per side, tokens
MEMORY = ((1, 8, 64), (4, 16, 64))  # peak memory at two workload sizes, each in its own process


def workload(tok, p: int, s: int, t: int, gen: torch.Generator) -> list[PromptPair]:
    renderer = PromptRenderer(tok)
    prompts = [
        renderer.prompt_ids(None, x.prompt) for x in read_prompts("data/prompts/prompts.jsonl", p)
    ]
    rand = lambda: torch.randint(0, 49152, (t,), generator=gen).tolist()  # noqa: E731
    return [PromptPair(q, q, {side: [rand() for _ in range(s)] for side in "ab"}) for q in prompts]


def scorer(model_a, model_b, pairs):
    return [score_prompt_pair(model_a, model_b, pair) for pair in pairs]


@torch.no_grad()
def naive(model_a, model_b, pairs):
    """Per (response, model): one forward with all logits; then KL both ways and JS."""
    out = []
    for pair in pairs:
        per_side = {}
        for side in "ab":
            rows = []
            for resp in pair.responses[side]:
                lps = []
                for model, prompt in ((model_a, pair.prompt_a), (model_b, pair.prompt_b)):
                    logits = model(torch.tensor([prompt + resp])).logits[0]
                    logits = logits if logits.dtype == torch.float64 else logits.float()
                    lp = torch.log_softmax(logits, -1)
                    lps.append(lp[len(prompt) - 1 : len(prompt) - 1 + len(resp)])
                la, lb = lps
                pa, pb = la.exp(), lb.exp()
                lm = torch.logaddexp(la, lb) - np.log(2.0)
                kl_ab = (pa * (la - lb)).sum(-1)
                kl_ba = (pb * (lb - la)).sum(-1)
                js = 0.5 * (pa * (la - lm)).sum(-1) + 0.5 * (pb * (lb - lm)).sum(-1)
                rows.append(torch.stack([kl_ab, kl_ba, js]).numpy())
            per_side[side] = rows
        out.append(per_side)
    return out


def max_diff(got, ref) -> tuple[float, float]:
    """Max abs and max relative difference of per-position KL(A||B), KL(B||A), JS."""
    worst = rel = 0.0
    for unit, r in zip(got, ref, strict=True):
        for side in "ab":
            sc = unit.sides[side]
            mine = np.stack([sc.kl_ab, sc.kl_ba, sc.js]).astype(np.float64)
            theirs = np.concatenate(r[side], axis=1).astype(np.float64)
            err = np.abs(mine - theirs)
            worst = max(worst, float(err.max()))
            rel = max(rel, float((err / np.maximum(np.abs(theirs), 1e-3)).max()))
    return worst, rel


def float64_check(models, pair, got, ref) -> dict[str, float]:
    """Both paths against a float64 forward of both models on one prompt's responses: max abs
    error of each (which of the two fp32 paths is closer to the exact value)."""
    m64 = [copy.deepcopy(m).double() for m in models]
    truth = naive(*m64, [pair])[0]
    return {
        "scorer_max_abs_err": max_diff([got], [truth])[0],
        "naive_max_abs_err": max(
            float(np.abs(np.concatenate(ref[s], 1) - np.concatenate(truth[s], 1)).max())
            for s in "ab"
        ),
    }


def run_flops(model_a, model_b, pairs) -> float:
    total = 0.0
    for model in (model_a, model_b):
        for pair in pairs:
            scored = sum(len(r) for side in "ab" for r in pair.responses[side])
            total += flops(model, len(pair.prompt_a) + scored, scored)
    return total


def timed(fn, *args):
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        out = fn(*args)
        seconds = time.perf_counter() - t0
    return seconds, mem.extra_mb, out


def peak_in_process(size: tuple[int, int, int]) -> float:
    """Peak extra RSS (MB) of the scorer on one workload, in a fresh process (after loading
    both models and a tiny warm-up, so only the scoring's own memory counts)."""
    arg = ",".join(map(str, size))
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.bench_diff", "--memory-only", arg],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return float(proc.stdout.strip().splitlines()[-1])


def memory_only(size: tuple[int, int, int]) -> None:
    torch.set_grad_enabled(False)
    models = [load_condition(parse_spec(spec))[0] for spec in PAIR]
    _, tok = load_condition(parse_spec(PAIR[0]))
    gen = torch.Generator().manual_seed(0)
    scorer(*models, workload(tok, 1, 1, 4, gen))
    pairs = workload(tok, *size, gen)
    _, extra, _ = timed(scorer, *models, pairs)
    print(extra)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--reps", type=int, default=2, help="best of this many (each path)")
    ap.add_argument("--out", default="benchmarks/results/diff.json")
    ap.add_argument("--memory-only", default=None, help="P,S,T: print the scorer's peak MB")
    args = ap.parse_args(argv)
    if args.memory_only:
        memory_only(tuple(int(x) for x in args.memory_only.split(",")))
        return {}
    torch.set_grad_enabled(False)
    models = [load_condition(parse_spec(spec))[0] for spec in PAIR]
    _, tok = load_condition(parse_spec(PAIR[0]))
    gen = torch.Generator().manual_seed(0)
    pairs = workload(tok, *HEADLINE, gen)
    scorer(*models, workload(tok, 1, 1, 4, gen))  # warm-up (compiles the fused kernels)
    best = {"peak": 0.0, "scorer": float("inf"), "naive": float("inf")}
    mem = {}
    for _ in range(args.reps):  # interleaved: the machine is shared
        best["peak"] = max(best["peak"], matmul_peak(torch.float32))
        sec, mem["scorer"], got = timed(scorer, *models, pairs)
        best["scorer"] = min(best["scorer"], sec)
        sec, mem["naive"], ref = timed(naive, *models, pairs)
        best["naive"] = min(best["naive"], sec)

    work = run_flops(*models, pairs)
    diffs = max_diff(got, ref)
    positions = sum(len(r) for p in pairs for s in "ab" for r in p.responses[s])
    result = {
        "diff_speedup_vs_naive": best["naive"] / best["scorer"],
        "diff_fraction_of_matmul_peak": work / best["scorer"] / 1e9 / best["peak"],
        "diff_max_abs_diff": diffs[0],
        "diff_max_rel_diff": diffs[1],
        "float64_check_first_prompt": float64_check(models, pairs[0], got[0], ref[0]),
        "diff_peak_extra_mb": {"x".join(map(str, size)): peak_in_process(size) for size in MEMORY},
        "scorer_peak_extra_mb_in_timed_run": mem["scorer"],
        "naive_peak_extra_mb": mem["naive"],
        "scorer_seconds": best["scorer"],
        "naive_seconds": best["naive"],
        "matmul_peak_gflops": best["peak"],
        "scorer_gflops": work / best["scorer"] / 1e9,
        "positions_scored_per_model": positions,
        "workload": {
            "prompts": HEADLINE[0],
            "samples_per_side": HEADLINE[1],
            "tokens": HEADLINE[2],
        },
        "machine": machine_info(),
    }
    write_result(Path(args.out), result)
    print({k: v for k, v in result.items() if k != "machine"})
    return result


if __name__ == "__main__":
    main()
