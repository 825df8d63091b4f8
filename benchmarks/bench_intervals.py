"""Coverage of the per-prompt intervals at small n: delta-method vs jackknife t-intervals.

For each model pair (:mod:`divscope.estimators.coverage`: bigram models whose KL rate is known
exactly) and each number of responses n = 2, 4, 8, 16, 20,000 replicate prompts each draw n
responses from A; each replicate's 95% t-interval of the ratio estimator (``mc_kl``'s), with
the delta-method and with the jackknife standard error, clipped to [0, inf), either covers the
exact rate or not. Also the ratio estimator's relative bias and the median interval widths.
Headline keys: the smallest coverage over the three study pairs at n = 4..16, both methods.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from benchmarks.common import machine_info, write_result
from divscope.estimators.coverage import coverage, pairs, stress_pairs

NS = (2, 4, 8, 16)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--replicates", type=int, default=20_000)
    ap.add_argument("--out", default="benchmarks/results/intervals.json")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    rows = []
    for group, chosen in (("study", pairs()), ("stress", stress_pairs())):
        for i, pair in enumerate(chosen):
            for k in NS:
                rng = np.random.default_rng([i, k, 0 if group == "study" else 1])
                c = coverage(pair, k, args.replicates, rng)
                rows.append({"group": group, "pair": pair.name, "n": k, **c})
    study = [r for r in rows if r["group"] == "study" and r["n"] >= 4]
    result = {
        "min_coverage_jackknife_study_n4_16": min(r["coverage_jackknife"] for r in study),
        "min_coverage_delta_study_n4_16": min(r["coverage_delta"] for r in study),
        "min_coverage_jackknife_stress_n4_16": min(
            r["coverage_jackknife"] for r in rows if r["group"] == "stress" and r["n"] >= 4
        ),
        "replicates": args.replicates,
        "ci_level": 0.95,
        "seconds": time.perf_counter() - t0,
        "rows": rows,
        "machine": machine_info(),
    }
    write_result(Path(args.out), result)
    return result


def markdown(result: dict) -> str:
    """The README's table."""
    lines = [
        "| pair | n | exact KL rate | ratio bias | delta-method coverage | jackknife coverage |",
        "|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['pair']} | {r['n']} | {r['truth']:.4f} | {r['bias_rel']:+.1%} "
            f"| {r['coverage_delta']:.1%} | {r['coverage_jackknife']:.1%} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    res = main()
    print(json.dumps({k: v for k, v in res.items() if not isinstance(v, dict | list)}, indent=2))
    print(markdown(res))
