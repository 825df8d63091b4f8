"""How much of the exact KL / JS does a top-20 API view recover? (README, "divscope diff")

Runs ``divscope diff`` on a pair (default: the shipped base vs pirate-LoRA pair, all 72 prompts,
4 samples per side, 48 tokens), then reads the sample files it wrote, as any API consumer
would, and compares at every scored position the top-k bounds with the exact values stored
beside them: the older tail-bucket lower bounds (everything outside the tokens known on both
sides merged into one bucket), the capped lower bounds ``topk_kl_lb``, ``topk_js_lb`` and the
JS upper bound ``topk_js_ub`` (:mod:`divscope.estimators.bounds`), and the per-prompt ``mc_kl`` of ``divscope rank``
with the exact ``kl``. Prints one JSON document.

    python experiments/scripts/api_view_vs_exact.py [--b SPEC] [--prompts N] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from divscope.cli import main as cli
from divscope.estimators.bounds import topk_bounds
from divscope.estimators.ranking import rank_prompts
from divscope.estimators.topk import coarse_bounds
from divscope.samples import load_pair

PAIR = ("smollm2-135m-instruct", "smollm2-135m-instruct,adapter=data/adapters/smollm2-pirate-lora")


def compare(out: Path) -> dict:
    a, b = load_pair(out / "samples_a.jsonl", out / "samples_b.jsonl")
    raw = {
        s: [json.loads(x) for x in (out / f"samples_{s}.jsonl").read_text().splitlines()]
        for s in "ab"
    }
    ratios: dict[str, list[float]] = {"kl": [], "js": []}
    sums = {"kl_lb": 0.0, "kl": 0.0, "js_lb": 0.0, "js": 0.0}
    sums |= {"kl_capped": 0.0, "js_capped": 0.0, "js_ub": 0.0, "positions": 0}
    for side, (own, other) in (("a", (a, b)), ("b", (b, a))):
        name = "kl_ab" if side == "a" else "kl_ba"
        for rec, raw_rec in zip(own.records, raw[side], strict=True):
            p_kl = p_lb = p_js = p_jlb = 0.0
            for resp, raw_resp in zip(rec.usable, raw_rec["responses"], strict=True):
                kl_lb, js_lb = coarse_bounds(resp.scores, resp.cross[other.model].scores)
                capped = topk_bounds(resp.scores, resp.cross[other.model].scores)
                sums["kl_capped"] += float(np.nansum(capped.kl_lb))
                sums["js_capped"] += float(np.nansum(capped.js_lb))
                sums["js_ub"] += float(np.nansum(capped.js_ub))
                sums["positions"] += len(capped.js_ub)
                exact = raw_resp["exact"]
                p_lb += float(np.nansum(kl_lb))
                p_kl += float(np.sum(exact[name]))
                p_jlb += float(np.nansum(js_lb))
                p_js += float(np.sum(exact["js"]))
            sums["kl_lb"] += p_lb
            sums["kl"] += p_kl
            sums["js_lb"] += p_jlb
            sums["js"] += p_js
            ratios["kl"].append(p_lb / p_kl)
            ratios["js"].append(p_jlb / p_js)
    ranking = json.loads((out / "ranking.json").read_text())
    api = rank_prompts(a, b, metric="mc_kl", n_bootstrap=200)
    exact_kl = {p["index"]: p["scores"]["kl"] for p in ranking["prompts"]}
    mc = {p.index: p.scores["mc_kl"] for p in api.prompts}
    idx = sorted(exact_kl)
    rho = float(np.corrcoef(np.argsort(np.argsort([exact_kl[i] for i in idx])),
                            np.argsort(np.argsort([mc[i] for i in idx])))[0, 1])  # fmt: skip
    return {
        "pair": ranking["models"],
        "prompts": len(idx),
        "overall_share_of_exact": {
            "tail_bucket_kl_lb": sums["kl_lb"] / sums["kl"],
            "tail_bucket_js_lb": sums["js_lb"] / sums["js"],
            "topk_kl_lb": sums["kl_capped"] / sums["kl"],
            "topk_js_lb": sums["js_capped"] / sums["js"],
            "topk_js_ub": sums["js_ub"] / sums["js"],
        },
        "mean_per_position_nats": {
            k: sums[k] / sums["positions"] for k in ("js_lb", "js_capped", "js", "js_ub")
        },
        "per_prompt_share_of_exact": {
            k: {q: float(np.percentile(v, q)) for q in (0, 10, 50, 90, 100)}
            for k, v in ratios.items()
        },
        "mc_kl_rank_vs_exact_kl": {
            "spearman_rho": rho,
            "mean_mc_kl": float(np.mean(list(mc.values()))),
            "mean_exact_kl": float(np.mean(list(exact_kl.values()))),
        },
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--a", default=PAIR[0])
    ap.add_argument("--b", default=PAIR[1])
    ap.add_argument("--prompts", type=int, default=None)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--out", default="eval_results/api_view_vs_exact")
    args = ap.parse_args()
    out = Path(args.out)
    if not (out / "ranking.json").exists():
        argv = ["diff", "--a", args.a, "--b", args.b, "--prompts", "data/prompts/prompts.jsonl"]
        argv += ["--samples", str(args.samples), "--max-new-tokens", str(args.max_new_tokens)]
        argv += ["--out", str(out), "--quiet"]
        argv += ["--max-prompts", str(args.prompts)] if args.prompts else []
        assert cli(argv) == 0
    print(json.dumps(compare(out), indent=2))


if __name__ == "__main__":
    main()
