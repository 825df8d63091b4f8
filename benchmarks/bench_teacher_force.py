"""Teacher forcing: divscope's scorer against a naive baseline, on the real SmolLM2-135M.

Workload: one synthetic prompt per persona (lengths 40..40+N-1 tokens, so rows need padding)
and synthetic response ids (teacher forcing cost does not depend on the content), scored
under every persona against persona 0. Two paths, same numbers:

* naive (written here): one forward pass per (response, persona), logits for every position,
  log-softmax of everything, then JS and both KLs on the response positions;
* divscope: :func:`divscope.teacher_force.teacher_force` (personas batched with right padding,
  output projection only at response positions in fp32, fused divergence).

Reported per configuration (personas 4/8/16 x response length 32/128/512): seconds, tokens/s,
achieved FLOP/s (2 x non-embedding parameters x tokens + 2 x hidden x vocab per scored
position) as a fraction of a matmul peak measured in the same run at the same dtype, the
divergence's share of the scorer's time, peak extra memory (RSS), and the max abs difference.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import machine_info, write_result
from divscope.divergence import js_and_kls
from divscope.models import load_model
from divscope.teacher_force import PERSONA_BATCH, output_head, teacher_force

HEADLINE = (8, 128)  # personas, response tokens
PERSONAS_FILE = "data/personas/core.yaml"
RESPONSE = (
    "Honestly, the best way to learn a new language is to use it every day: read short "
    "stories, talk with native speakers, and do not be afraid of making mistakes."
)


def matmul_peak(dtype: torch.dtype, n: int = 2048, reps: int = 6) -> float:
    """Best GFLOP/s of an n x n x n matmul (the machine's practical peak at this dtype)."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    best = 0.0
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        best = max(best, 2 * n**3 / (time.perf_counter() - t) / 1e9)
    return best


class PeakRSS:
    """Samples the process's RSS in a thread; ``extra_mb`` is the peak above the start."""

    def __enter__(self) -> PeakRSS:
        self.start = self.peak = self._rss()
        self._stop = False
        self._t = threading.Thread(target=self._poll, daemon=True)
        self._t.start()
        return self

    def _poll(self) -> None:
        while not self._stop:
            self.peak = max(self.peak, self._rss())
            time.sleep(0.002)

    @staticmethod
    def _rss() -> float:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096 / 2**20

    def __exit__(self, *exc: object) -> None:
        self._stop = True
        self._t.join()
        self.extra_mb = self.peak - self.start


@torch.no_grad()
def naive(model: torch.nn.Module, prompts: list[list[int]], response: list[int], g: int):
    """One forward per persona, all logits, log-softmax of everything, then the divergences."""
    rows = []
    for p in prompts:
        logits = model(torch.tensor([p + response])).logits[0].float()
        lp = torch.log_softmax(logits, -1)
        rows.append(lp[len(p) - 1 : len(p) - 1 + len(response)])
    out = []
    for lp in rows:
        js, kf, kr = js_and_kls(rows[g], lp)
        out.append((js.mean().item(), kf.mean().item(), kr.mean().item()))
    return out


def flops(model: torch.nn.Module, tokens: int, scored: int) -> float:
    emb = model.get_input_embeddings().weight.numel()
    head = model.get_output_embeddings().weight
    tied = head.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    non_emb = sum(p.numel() for p in model.parameters()) - emb - (0 if tied else head.numel())
    return 2 * non_emb * tokens + 2 * head.shape[0] * head.shape[1] * scored


def _timed(fn, *args, **kwargs) -> tuple[float, float, object]:
    """Seconds, peak extra RSS (MB) and result of one call."""
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        seconds = time.perf_counter() - t0
    return seconds, mem.extra_mb, out


def run(personas: list[int], lengths: list[int], dtype: str, reps: int) -> dict:
    """The sweep. The machine is shared, so the matmul peak, the scorer and the naive path are
    measured in turn ``reps`` times per configuration (at least 5 for the headline) and each
    keeps its best time."""
    model, _ = load_model("smollm2-135m-instruct", dtype=dtype)
    head = output_head(model)
    dt = getattr(torch, dtype)
    peak = matmul_peak(dt)
    gen = torch.Generator().manual_seed(0)
    configs = []
    for n in personas:
        prompts = [torch.randint(0, 49152, (40 + i,), generator=gen).tolist() for i in range(n)]
        for t in lengths:
            response = torch.randint(0, 49152, (t,), generator=gen).tolist()
            tokens = sum(len(p) + t for p in prompts)
            teacher_force(model, prompts, response, 0, head=head)  # warm-up (compiles once)
            fast = slow = float("inf")
            headline = (n, t) == HEADLINE
            for _ in range(max(reps, 5) if headline else reps):
                peak = max(peak, matmul_peak(dt, reps=2))
                prof: dict[str, float] = {}
                s, mem, u = _timed(
                    teacher_force, model, prompts, response, 0, head=head, profile=prof
                )
                if s < fast:
                    fast, mem_fast, prof_fast = s, mem, prof
                s, mem, ref = _timed(naive, model, prompts, response, 0)
                if s < slow:
                    slow, mem_slow = s, mem
            diff = max(
                max(abs(u.js[i] - r[0]), abs(u.kl_fwd[i] - r[1]), abs(u.kl_rev[i] - r[2]))
                for i, r in enumerate(ref)
            )
            f = flops(model, tokens, n * t)
            configs.append(
                {
                    "personas": n,
                    "response_tokens": t,
                    "tokens": tokens,
                    "scorer_s": fast,
                    "naive_s": slow,
                    "speedup_vs_naive": slow / fast,
                    "scorer_tokens_per_s": tokens / fast,
                    "naive_tokens_per_s": tokens / slow,
                    "scorer_gflops": f / fast / 1e9,
                    "fraction_of_matmul_peak": f / fast / 1e9 / peak,
                    "divergence_time_fraction": prof_fast.get("divergence", 0.0) / fast,
                    "scorer_profile_s": prof_fast,
                    "scorer_peak_extra_mb": mem_fast,
                    "naive_peak_extra_mb": mem_slow,
                    "max_abs_diff": diff,
                }
            )
            print(json.dumps(configs[-1]), flush=True)
    for c in configs:  # the peak only ever rises: use the run's best for every configuration
        c["fraction_of_matmul_peak"] = c["scorer_gflops"] / peak
    mid = next(
        (c for c in configs if (c["personas"], c["response_tokens"]) == HEADLINE),
        configs[len(configs) // 2],
    )
    return {
        "speedup_vs_naive": mid["speedup_vs_naive"],
        "fraction_of_matmul_peak": mid["fraction_of_matmul_peak"],
        "divergence_time_fraction": mid["divergence_time_fraction"],
        "max_abs_diff": max(c["max_abs_diff"] for c in configs),
        "headline_config": {"personas": mid["personas"], "response_tokens": mid["response_tokens"]},
        "matmul_peak_gflops": peak,
        "dtype": dtype,
        "threads": torch.get_num_threads(),
        "persona_batch": PERSONA_BATCH,
        "reps": reps,
        "configs": configs,
        "machine": machine_info(),
    }


def bf16_check(reps: int, n: int = 8, t: int = 128) -> dict:
    """bf16 against fp32 on CPU: speed at the headline size, accuracy on a real persona unit.

    Accuracy: 6 personas from ``data/personas/core.yaml`` answering the first question of
    ``data/questions/eval20.yaml`` with a fixed natural-language response (teacher forced),
    scored in fp32 and in bf16 (bf16 weights and activations, fp32 output projection and
    divergences); the relative error of each JS / KL value against fp32 is reported.
    """
    from divscope.personas import PromptRenderer, load_personas, load_questions

    models = {d: load_model("smollm2-135m-instruct", dtype=d) for d in ("float32", "bfloat16")}
    tok = models["float32"][1]
    renderer = PromptRenderer(tok)
    question = load_questions("data/questions/eval20.yaml", 1)[0]
    prompts = [renderer.prompt_ids(p, question) for p in load_personas(PERSONAS_FILE, 6)]
    response = tok(RESPONSE, add_special_tokens=False)["input_ids"]
    vals = {}
    for d, (model, _) in models.items():
        u = teacher_force(model, prompts, response, 0)
        vals[d] = np.stack([u.js, u.kl_fwd, u.kl_rev])[:, 1:]  # generator row is exactly 0
    rel = np.abs(vals["bfloat16"] - vals["float32"]) / vals["float32"]

    gen = torch.Generator().manual_seed(0)
    synth = [torch.randint(0, 49152, (40 + i,), generator=gen).tolist() for i in range(n)]
    resp = torch.randint(0, 49152, (t,), generator=gen).tolist()
    tokens = sum(len(p) + t for p in synth)
    best = {d: float("inf") for d in models}
    peak = {"float32": 0.0, "bfloat16": 0.0}
    for model, _ in models.values():
        teacher_force(model, synth, resp, 0)  # warm-up
    for _ in range(reps):
        for d, (model, _) in models.items():
            peak[d] = max(peak[d], matmul_peak(getattr(torch, d), reps=2))
            t0 = time.perf_counter()
            teacher_force(model, synth, resp, 0)
            best[d] = min(best[d], time.perf_counter() - t0)
    f = flops(models["float32"][0], tokens, n * t)
    return {
        "bf16_speedup_vs_fp32": best["float32"] / best["bfloat16"],
        "bf16_max_relative_error": float(rel.max()),
        "bf16_holds_accuracy": bool(rel.max() <= 1e-3),
        "bf16_relative_error": {
            k: float(rel[i].max()) for i, k in enumerate(("js", "kl_fwd", "kl_rev"))
        },
        "fp32_values": vals["float32"].tolist(),
        "bf16_values": vals["bfloat16"].tolist(),
        "timing_config": {"personas": n, "response_tokens": t, "tokens": tokens},
        "scorer_s": best,
        "scorer_tokens_per_s": {d: tokens / s for d, s in best.items()},
        "matmul_peak_gflops": peak,
        "fraction_of_matmul_peak": {d: f / best[d] / 1e9 / peak[d] for d in models},
        "note": "bf16 FLOP fraction counts the fp32 output projection at the bf16 peak",
        "reps": reps,
        "machine": machine_info(),
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--personas", default="4,8,16")
    ap.add_argument("--lengths", default="32,128,512")
    ap.add_argument(
        "--dtype", default="float32", help="float32: the sweep; bfloat16: bf16 vs fp32 check"
    )
    ap.add_argument(
        "--reps", type=int, default=2, help="best of this many (the headline: of at least 5)"
    )
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.dtype == "bfloat16":
        result = bf16_check(args.reps)
        write_result(Path(args.out or "benchmarks/results/teacher_force_bfloat16.json"), result)
        return result
    result = run(
        [int(x) for x in args.personas.split(",")],
        [int(x) for x in args.lengths.split(",")],
        args.dtype,
        args.reps,
    )
    write_result(Path(args.out or f"benchmarks/results/teacher_force_{args.dtype}.json"), result)
    return result


if __name__ == "__main__":
    r = main()
    print(json.dumps({k: v for k, v in r.items() if not isinstance(v, list | dict)}, indent=2))
