"""``divscope diff --layers``: the per-block decomposition's unit on the shipped pair.

The pair: SmolLM2-135M-Instruct and the same model with the pirate LoRA adapter (merged),
fp32, 30 blocks. Workload: P real prompts (chat template), S of A's samples per prompt of T
tokens (random ids: the cost does not depend on the content). Timed:

* layers: :func:`divscope.diff.layers.score_layers` per prompt (both models' own forwards,
  both walks' L + 1 hybrids each over the residual stream below the switch point, drift with
  its floor, the fp32 heads into the fused KL);
* the plain diff's unit on the same prompts (:func:`divscope.diff.score.score_prompt_pair`,
  S samples per side, as ``divscope diff`` scores them).

Headline: ``layers_fraction_of_matmul_peak`` = FLOPs of the block evaluations and heads the
decomposition needs (2 x block parameters x tokens for 2 own stacks, the floor's stack and
2 x L(L+1)/2 hybrid blocks; 2 x hidden x vocab per scored position for 2 + 2(L + 1) heads)
/ seconds / a matmul peak measured in the same run; ``layers_cost_ratio`` = layers seconds /
plain diff seconds (with ``n_layers``); peak extra memory (RSS) of the layer unit run on 1,
4 and 12 prompts (one prompt's work repeated: the same shapes), each in a fresh process (it
must not grow with prompts).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from benchmarks.bench_diff import PAIR, workload
from benchmarks.bench_teacher_force import layer_flops, matmul_peak
from benchmarks.common import PeakRSS, machine_info, write_result
from divscope.diff.conditions import load_condition, parse_spec
from divscope.diff.layers import score_layers
from divscope.diff.score import score_prompt_pair

HEADLINE = (2, 4, 32)  # prompts, samples, tokens
# peak memory at three prompt counts, each in its own process
MEMORY = ((1, 2, 16), (4, 2, 16), (12, 2, 16))


def layers(model_a, model_b, pairs):
    return [score_layers(model_a, model_b, p.prompt_a, p.responses["a"]) for p in pairs]


def plain(model_a, model_b, pairs):
    return [score_prompt_pair(model_a, model_b, p) for p in pairs]


def timed(fn, *args):
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        out = fn(*args)
        seconds = time.perf_counter() - t0
    return seconds, mem.extra_mb, out


def memory_only(size: tuple[int, int, int]) -> None:
    torch.set_grad_enabled(False)
    models = [load_condition(parse_spec(spec))[0] for spec in PAIR]
    _, tok = load_condition(parse_spec(PAIR[0]))
    gen = torch.Generator().manual_seed(0)
    layers(*models, workload(tok, 1, 1, 2, gen))
    p, s, t = size
    # one prompt's unit P times: the same shapes each time, so any growth is held memory
    _, extra, _ = timed(layers, *models, workload(tok, 1, s, t, gen) * p)
    print(extra)


def peak_in_process(size: tuple[int, int, int]) -> float:
    arg = ",".join(map(str, size))
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.bench_layers", "--memory-only", arg],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return float(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="benchmarks/results/layers.json")
    ap.add_argument("--memory-only", default=None, help="P,S,T: print the unit's peak MB")
    args = ap.parse_args(argv)
    if args.memory_only:
        memory_only(tuple(int(x) for x in args.memory_only.split(",")))
        return {}
    torch.set_grad_enabled(False)
    models = [load_condition(parse_spec(spec))[0] for spec in PAIR]
    _, tok = load_condition(parse_spec(PAIR[0]))
    gen = torch.Generator().manual_seed(0)
    pairs = workload(tok, *HEADLINE, gen)
    warm = workload(tok, 1, 1, 2, gen)
    layers(*models, warm), plain(*models, warm)  # warm-up (compiles the fused kernels)
    peak = matmul_peak(torch.float32)
    t_plain, _, _ = timed(plain, *models, pairs)
    t_layers, mem, got = timed(layers, *models, pairs)
    peak = max(peak, matmul_peak(torch.float32))
    work = layer_flops(models[0], pairs)
    result = {
        "layers_fraction_of_matmul_peak": work / t_layers / 1e9 / peak,
        "layers_cost_ratio": t_layers / t_plain,
        "n_layers": models[0].config.num_hidden_layers,
        "layers_peak_extra_mb": {"x".join(map(str, s)): peak_in_process(s) for s in MEMORY},
        "layers_seconds": t_layers,
        "plain_diff_seconds": t_plain,
        "layers_gflops": work / t_layers / 1e9,
        "matmul_peak_gflops": peak,
        "peak_extra_mb_in_timed_run": mem,
        "kl_total_nats_per_token": sum(u.kl_total for u in got) / sum(u.n_positions for u in got),
        "load_average": os.getloadavg(),
        "workload": {"prompts": HEADLINE[0], "samples": HEADLINE[1], "tokens": HEADLINE[2]},
        "machine": machine_info(),
    }
    write_result(Path(args.out), result)
    print({k: v for k, v in result.items() if k != "machine"})
    return result


if __name__ == "__main__":
    main()
