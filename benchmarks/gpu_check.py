"""GPU check: everything that matters on one CUDA device, in one command (under 8 minutes on
an H100, no network, no download).

    PYTHONPATH=src python -m benchmarks.gpu_check --out DIR [--sections a,b,...] [--tiny]

Writes ``DIR/gpu_check.json`` (headline keys at the top level, details under ``sections``)
after every section, so a run cut short still leaves what it measured, and prints a table.
A section that fails records its error and the rest run; ``--sections`` picks some (their
results replace those of an earlier run in the same file, the others are kept). Sections:

* ``peaks``: bf16 and fp32 (TF32 off) matmul peaks of this device, measured in this run.
* ``accuracy``: a small random Qwen2 config scored in bf16 and in fp32 by the diff scorer
  (per position) and the persona scorer (per sequence), against a float64 forward of the same
  weights on the same device: max relative error of JS and KL.
* ``persona``: :func:`divscope.personas.units.score_question` (prompts run once and their
  keys/values reused, fused divergence) on a Qwen2.5-7B-shaped model with random bf16 weights:
  one question, 8 personas each answering once (64 sequences of 256 tokens), prompts of ~300
  tokens: MFU, tokens/s, peak memory.
* ``diff``: :func:`divscope.diff.score.score_prompt_pair` on two 7B-shaped models (B = A plus
  a small perturbation): 4 prompts x 8 samples per side x 256 tokens.
* ``generate``: transformers' ``generate`` on the 7B-shaped model, sampling exactly
  (``do_sample=True, top_k=0, top_p=1.0, temperature=1.0``) at batch 1, 16 and 64: tokens/s,
  the baseline for a vLLM run (vLLM cannot be installed on a machine without network; the
  result says whether it was importable).
* ``layers``: the ``--layers`` unit (:func:`divscope.diff.layers.score_layers`: both walks
  of hybrids, drift, heads) on a Qwen2.5-1.5B-shaped pair (B = A perturbed), 2 prompts; its
  FLOPs counted as bench_layers counts them.

MFU: model FLOPs (:data:`FLOP_FORMULA`) / seconds / the matmul peak measured in this run at
the model's dtype (bf16 on a GPU). Timings: best of a few repetitions, each bracketed by
``torch.cuda.synchronize()``, after a warm-up (the first call compiles the fused divergence).
``--tiny`` runs the same code on CPU with tiny fp32 configs in well under a minute (the test
suite runs it, so the script cannot rot before a GPU is at hand).

Imports, for an image that has torch, transformers, peft, numpy and pandas but not divscope's
other dependencies: the standard library, torch, numpy and transformers (``Qwen2Config``,
``Qwen2ForCausalLM``; divscope uses ``DynamicCache``); divscope's ``personas.units`` and
``diff.score`` (which bring ``models.teacher_force``, ``models.generate``, ``divergence.*``,
``bounded`` and ``runmeta``, nothing else of divscope); ``benchmarks.common`` and
``benchmarks.bench_teacher_force`` (the FLOP counter and the matmul peak). None of these
imports scipy, matplotlib, seaborn, yaml, tqdm, ray, vllm, llama_cpp or gguf on its own
(tests/test_gpu_check.py checks every module the run loads against the requirements of torch,
transformers, peft, numpy and pandas), so no wheel has to travel: copy the checkout, run it.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import math
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.bench_teacher_force import causal_contexts, flops, matmul_peak
from benchmarks.common import PeakRSS, machine_info, synchronize, write_result
from divscope.diff.score import PromptPair, score_prompt_pair
from divscope.models.teacher_force import PERSONA_BATCH, output_head
from divscope.personas.units import QuestionUnit, score_question
from divscope.runmeta import device_info as run_device_info

SECTIONS = ("peaks", "accuracy", "persona", "diff", "generate", "layers")
RESULT_FILE = "gpu_check.json"
TARGET_MFU = 0.40  # the persona and diff scorers' target on a GPU (issue 26)
FLOP_FORMULA = (
    "2 x non-embedding parameters (the matmul weights, plus the norms' few) x tokens run "
    "+ 4 x layers x heads x head_dim x keys attended summed over the tokens run (QK^T and AV; "
    "causal: a token at position p attends to p + 1 keys, padding and masked keys not counted) "
    "+ 2 x hidden x vocab x scored positions (the fp32 output projection)"
)
REL_FLOOR = 1e-4  # nats: relative errors are |x - ref| / max(ref, REL_FLOOR)
LOGIT_STD = 3.0  # the accuracy models' logit spread (a real LM's; random init gives ~0.5)
PERTURB = 0.05  # B = A + PERTURB x weight std x N(0, 1): above bf16's resolution (1/256)

# Qwen2.5-7B-Instruct's shape (its config.json), with random weights
QWEN_7B = dict(
    hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
    num_key_value_heads=4, vocab_size=152064, max_position_embeddings=32768,
    rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=False,
)  # fmt: skip
QWEN_1_5B = dict(
    hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
    num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768,
    rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=True,
)  # fmt: skip
SMALL = dict(
    hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8,
    num_key_value_heads=2, vocab_size=32768, max_position_embeddings=4096,
    rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=False,
)  # fmt: skip
TINY = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, vocab_size=512, max_position_embeddings=1024,
    rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=False,
)  # fmt: skip

HEADLINE_KEYS = (
    "device",
    "gpu_bf16_peak_tflops",
    "gpu_fp32_peak_tflops",
    "gpu_persona_mfu",
    "gpu_persona_tokens_per_s",
    "gpu_persona_peak_mem_gb",
    "gpu_diff_mfu",
    "gpu_diff_tokens_per_s",
    "gpu_diff_peak_mem_gb",
    "gpu_layers_mfu",
    "gpu_fp32_js_max_rel_err",
    "gpu_fp32_kl_max_rel_err",
    "gpu_bf16_js_max_rel_err",
    "gpu_bf16_kl_max_rel_err",
    "gpu_generate_tokens_per_s_b1",
    "gpu_generate_tokens_per_s_b16",
    "gpu_generate_tokens_per_s_b64",
)


@dataclass(frozen=True)
class Plan:
    """The sizes of one run: :data:`GPU_PLAN` or ``--tiny``'s :data:`TINY_PLAN`."""

    big: dict[str, Any]  # the persona / diff / generation model
    pair: dict[str, Any]  # the --layers pair
    small: dict[str, Any]  # the accuracy check's model
    dtype: torch.dtype  # of big and pair
    personas: int = 8  # each answers once: personas x personas sequences
    prompt_tokens: int = 300
    answer_tokens: int = 256
    diff_prompts: int = 4
    diff_samples: int = 8  # per side
    diff_prompt_tokens: int = 128
    diff_tokens: int = 256
    gen_batches: tuple[int, ...] = (1, 16, 64)
    gen_prompt_tokens: int = 64
    gen_new_tokens: int = 128
    peak_n: int = 8192
    peak_inner: int = 10
    reps: int = 3
    budget_s: dict[str, float] = field(default_factory=dict)  # per section: stop repeating


GPU_PLAN = Plan(
    QWEN_7B, QWEN_1_5B, SMALL, torch.bfloat16,
    budget_s={"peaks": 20, "accuracy": 45, "persona": 100, "diff": 110, "generate": 90,
              "layers": 60},
)  # fmt: skip
TINY_PLAN = Plan(
    TINY, TINY, TINY, torch.float32, prompt_tokens=24, answer_tokens=16, diff_prompts=2,
    diff_samples=3, diff_prompt_tokens=12, diff_tokens=16, gen_prompt_tokens=8,
    gen_new_tokens=4, peak_n=256, peak_inner=4, reps=2,
    budget_s={"peaks": 5, "accuracy": 10, "persona": 10, "diff": 10, "generate": 10,
              "layers": 10},
)  # fmt: skip


@dataclass
class Run:
    """One run's state: plan, device, the peaks measured so far, the models built so far."""

    plan: Plan
    device: torch.device
    peaks_gflops: dict[str, float] = field(default_factory=dict)
    models: dict[str, Any] = field(default_factory=dict)
    build_s: float | None = None  # seconds to build the 7B-shaped model (random init)

    def peak(self, dtype: torch.dtype) -> float:
        """This device's matmul peak at ``dtype`` (GFLOP/s), measured on first use."""
        name = str(dtype).removeprefix("torch.")
        if name not in self.peaks_gflops:
            p = self.plan
            self.peaks_gflops[name] = matmul_peak(dtype, p.peak_n, 5, self.device, p.peak_inner)
        return self.peaks_gflops[name]

    def big(self) -> Any:
        """The 7B-shaped model (built on first use, then kept for the next sections)."""
        if "big" not in self.models:
            t0 = time.perf_counter()
            self.models["big"] = build_model(self.plan.big, self.plan.dtype, self.device, seed=0)
            self.build_s = time.perf_counter() - t0
        return self.models["big"]

    def free(self, *names: str) -> None:
        for name in names or list(self.models):
            self.models.pop(name, None)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def build_model(shape: dict[str, Any], dtype: torch.dtype, device: torch.device, seed: int):
    """A Qwen2 causal LM of this shape with random weights (transformers' own init, as
    ``from_pretrained(dtype=...)`` would hold them: parameters in ``dtype``, the rotary
    frequencies in fp32), built directly on ``device`` (no CPU copy, no download), in eval
    mode."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    config = Qwen2Config(**shape, use_sliding_window=False)
    torch.manual_seed(seed)
    with device:
        try:
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        except TypeError:  # transformers before 4.56 calls it torch_dtype
            model = AutoModelForCausalLM.from_config(config, torch_dtype=dtype)
    if next(model.parameters()).device != device:  # a transformers that ignores the context
        model.to(device)
    return model.eval()


def with_dtype(model: Any, dtype: torch.dtype) -> Any:
    """A copy of ``model`` with its parameters in ``dtype`` (buffers such as the rotary
    frequencies keep theirs, as when a checkpoint is loaded with ``dtype=``)."""
    out = copy.deepcopy(model)
    for p in out.parameters():
        p.data = p.data.to(dtype)
    return out


@torch.no_grad()
def perturbed(model: Any, scale: float, seed: int) -> Any:
    """A copy of ``model`` with every weight w moved by ``scale x std(w) x N(0, 1)``."""
    other = copy.deepcopy(model)
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    for p in other.parameters():
        noise = torch.randn(p.shape, generator=gen, device=p.device, dtype=torch.float32)
        p.add_((noise * scale * p.float().std().clamp(min=1e-3)).to(p.dtype))
    return other


def best_time(fn: Callable[[], Any], device: torch.device, reps: int, budget_s: float):
    """``(best seconds, last result)`` of up to ``reps`` calls, each synchronize-bracketed;
    no new call starts once ``budget_s`` seconds have passed (at least one runs)."""
    start, best, out = time.perf_counter(), float("inf"), None
    for _ in range(reps):
        synchronize(device)
        t0 = time.perf_counter()
        out = fn()
        synchronize(device)
        best = min(best, time.perf_counter() - t0)
        if time.perf_counter() - start > budget_s:
            break
    return best, out


class PeakMemory:
    """Peak memory of a ``with`` block in GB: on CUDA ``torch.cuda.max_memory_allocated``
    (``peak_gb``: every tensor, weights included; ``extra_gb``: above the start); on CPU the
    resident set above the start (:class:`benchmarks.common.PeakRSS`) for both."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak_gb = self.extra_gb = float("nan")

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
        else:
            self.rss = PeakRSS().__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
            self.peak_gb, self.extra_gb = peak / 1e9, (peak - self.start) / 1e9
        else:
            self.rss.__exit__(*exc)
            self.peak_gb = self.extra_gb = self.rss.extra_mb * 2**20 / 1e9


def mfu_bound(body: float, head: float, run: Run, dtype: torch.dtype) -> float:
    """The MFU if the body ran at the ``dtype`` peak and the fp32 output projection at the fp32
    peak (TF32 off): how far the fp32 head alone keeps the scorer from the target."""
    ideal_s = body / (run.peak(dtype) * 1e9) + head / (run.peak(torch.float32) * 1e9)
    return (body + head) / ideal_s / (run.peak(dtype) * 1e9)


def fused_compiled() -> dict[str, bool]:
    """Which fused divergence passes run compiled (False: ``torch.compile`` failed here, e.g.
    no C compiler for Triton, and divscope fell back to eager; slower, same values)."""
    from divscope.divergence import fused

    return {name: fn is not False for name, fn in fused._compiled.items()}


def rand_ids(n: int, vocab: int, gen: torch.Generator) -> list[int]:
    # ids from 1: 0 pads (any id would do, padded slots are never attended to)
    return torch.randint(1, vocab, (n,), generator=gen).tolist()


# ---------------------------------------------------------------------------------------
# sections: each returns {"headline": {...}, details...}


def section_peaks(run: Run) -> dict[str, Any]:
    """bf16 and fp32 (TF32 off) matmul peaks, n x n x n, best of 5 timings of ``inner``."""
    bf16, fp32 = run.peak(torch.bfloat16), run.peak(torch.float32)
    return {
        "headline": {"gpu_bf16_peak_tflops": bf16 / 1e3, "gpu_fp32_peak_tflops": fp32 / 1e3},
        "matmul_n": run.plan.peak_n,
        "allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
    }


def persona_unit(plan: Plan, vocab: int, gen: torch.Generator, n: int, t: int) -> QuestionUnit:
    """One question: ``n`` persona prompts of about ``plan.prompt_tokens`` tokens (lengths
    differ by a few, so batches are padded as in a real run), each persona answering once
    with ``t`` tokens."""
    lengths = [plan.prompt_tokens - n // 2 + i for i in range(n)]
    prompts = [rand_ids(k, vocab, gen) for k in lengths]
    return QuestionUnit(prompts, {g: rand_ids(t, vocab, gen) for g in range(n)}, None, [])


def persona_flops(model: Any, unit: QuestionUnit) -> tuple[float, float]:
    """``(total, output projection)`` model FLOPs of :func:`score_question` on ``unit``: each
    prompt once, then each response's tokens but its last against every persona's cached
    prompt; every (response, persona) position through the head."""
    plens = [len(p) for p in unit.prompts]
    tokens, scored = sum(plens), 0
    contexts = sum(causal_contexts(0, k) for k in plens)
    for r in unit.responses.values():
        tokens += len(plens) * (len(r) - 1)
        scored += len(plens) * len(r)
        contexts += sum(causal_contexts(k, k + len(r) - 1) for k in plens)
    head = flops(model, 0, scored)
    return flops(model, tokens, scored, contexts), head


def section_persona(run: Run) -> dict[str, Any]:
    """score_question on the 7B-shaped model: one question, every persona answering once."""
    plan, model = run.plan, run.big()
    vocab, gen = model.config.vocab_size, torch.Generator().manual_seed(1)
    head = output_head(model)  # built once per worker, as divscope.personas.units.Scorer does

    def score(unit: QuestionUnit) -> Any:
        return score_question(model, unit, persona_batch=PERSONA_BATCH, pad_id=0, head=head)

    score(persona_unit(plan, vocab, gen, 3, 8))  # warm-up: compiles the fused divergence
    unit = persona_unit(plan, vocab, gen, plan.personas, plan.answer_tokens)
    with PeakMemory(run.device) as mem:
        seconds, out = best_time(
            lambda: score(unit), run.device, plan.reps, plan.budget_s["persona"]
        )
    total, head_flops = persona_flops(model, unit)
    peak = run.peak(plan.dtype)
    n, t = plan.personas, plan.answer_tokens
    mfu = total / seconds / (peak * 1e9)
    finite = all(np.isfinite(u.js).all() and np.isfinite(u.kl_fwd).all() for u in out.values())
    return {
        "headline": {
            "gpu_persona_mfu": mfu,
            "gpu_persona_tokens_per_s": n * n * t / seconds,
            "gpu_persona_peak_mem_gb": mem.peak_gb,
        },
        "meets_target": mfu >= TARGET_MFU,
        "target_mfu": TARGET_MFU,
        "workload": {
            "personas": n,
            "answers": n,
            "answer_tokens": t,
            "prompt_tokens": [len(p) for p in unit.prompts],
        },  # fmt: skip
        "tokens_per_s_means": "scored response tokens (every answer under every persona) / s",
        "seconds": seconds,
        "seconds_per_2420_sequences": seconds / (n * n) * 2420,
        "model_tflop": total / 1e12,
        "head_flop_share": head_flops / total,
        "mfu_bound_fp32_head": mfu_bound(total - head_flops, head_flops, run, plan.dtype),
        "peak_mem_extra_gb": mem.extra_gb,
        "all_finite": bool(finite),
        "fused_compiled": fused_compiled(),
        "model": "Qwen2.5-7B-shaped" if plan.big is QWEN_7B else "tiny",
        "dtype": str(plan.dtype),
        "attn_implementation": getattr(model.config, "_attn_implementation", None),
        "model_build_s": run.build_s,
    }


def diff_pairs(plan: Plan, vocab: int, gen: torch.Generator, p: int, s: int) -> list[PromptPair]:
    """``p`` prompts (one prompt for both sides), ``s`` responses per side of
    ``plan.diff_tokens`` tokens each."""
    out = []
    for _ in range(p):
        q = rand_ids(plan.diff_prompt_tokens, vocab, gen)
        responses = {
            side: [rand_ids(plan.diff_tokens, vocab, gen) for _ in range(s)] for side in "ab"
        }
        out.append(PromptPair(q, q, responses))
    return out


def diff_flops(models: tuple[Any, Any], pairs: list[PromptPair]) -> tuple[float, float]:
    """``(total, output projection)`` model FLOPs of :func:`score_prompt_pair` over ``pairs``,
    both models: the prompt once, each response's tokens but its last against it, every
    response position through the head."""
    total = head = 0.0
    for pair in pairs:
        k = len(pair.prompt_a)
        rs = [r for side in "ab" for r in pair.responses[side]]
        tokens = k + sum(len(r) - 1 for r in rs)
        scored = sum(len(r) for r in rs)
        contexts = causal_contexts(0, k) + sum(causal_contexts(k, k + len(r) - 1) for r in rs)
        for model in models:
            total += flops(model, tokens, scored, contexts)
            head += flops(model, 0, scored)
    return total, head


def section_diff(run: Run) -> dict[str, Any]:
    """score_prompt_pair on two 7B-shaped models, B a small perturbation of A."""
    plan = run.plan
    a = run.big()
    if "big_b" not in run.models:
        run.models["big_b"] = perturbed(a, PERTURB, seed=2)
    b = run.models["big_b"]
    vocab, gen = a.config.vocab_size, torch.Generator().manual_seed(3)

    def score(pairs: list[PromptPair]) -> list[Any]:
        return [score_prompt_pair(a, b, pair) for pair in pairs]

    score(diff_pairs(plan, vocab, gen, 1, 1))  # warm-up: compiles the fused passes
    pairs = diff_pairs(plan, vocab, gen, plan.diff_prompts, plan.diff_samples)
    with PeakMemory(run.device) as mem:
        seconds, out = best_time(lambda: score(pairs), run.device, plan.reps, plan.budget_s["diff"])
    run.free("big_b")
    total, head_flops = diff_flops((a, b), pairs)
    mfu = total / seconds / (run.peak(plan.dtype) * 1e9)
    positions = sum(len(r) for pair in pairs for side in "ab" for r in pair.responses[side])
    finite = all(np.isfinite(u.sides[s].kl_ab).all() for u in out for s in "ab")
    return {
        "headline": {
            "gpu_diff_mfu": mfu,
            "gpu_diff_tokens_per_s": positions / seconds,
            "gpu_diff_peak_mem_gb": mem.peak_gb,
        },
        "meets_target": mfu >= TARGET_MFU,
        "target_mfu": TARGET_MFU,
        "workload": {
            "prompts": plan.diff_prompts,
            "samples_per_side": plan.diff_samples,
            "tokens": plan.diff_tokens,
            "prompt_tokens": plan.diff_prompt_tokens,
        },  # fmt: skip
        "tokens_per_s_means": "response positions scored (each under both models) / s",
        "seconds": seconds,
        "model_tflop": total / 1e12,
        "head_flop_share": head_flops / total,
        "mfu_bound_fp32_head": mfu_bound(total - head_flops, head_flops, run, plan.dtype),
        "peak_mem_extra_gb": mem.extra_gb,
        "all_finite": bool(finite),
        "fused_compiled": fused_compiled(),
    }


@torch.no_grad()
def reference_logprobs(model64: Any, prompt: list[int], response: list[int]) -> torch.Tensor:
    """float64 log-probabilities ``(T, V)`` predicting ``response`` after ``prompt``: one plain
    forward of a float64 model, the head applied here (nothing of divscope's scorer)."""
    device = next(model64.parameters()).device
    ids = torch.tensor([prompt + response], device=device)
    h = model64.model(input_ids=ids).last_hidden_state[0]
    h = h[len(prompt) - 1 : len(prompt) - 1 + len(response)]
    head = model64.get_output_embeddings()
    return torch.log_softmax(torch.nn.functional.linear(h, head.weight, head.bias), -1)


def reference_divergences(lp: torch.Tensor, lq: torch.Tensor) -> np.ndarray:
    """``(3, T)`` float64 JS(P,Q), KL(P||Q), KL(Q||P) per position, textbook formulas."""
    p, q = lp.exp(), lq.exp()
    lm = torch.logaddexp(lp, lq) - math.log(2.0)
    kl_pq, kl_qp = (p * (lp - lq)).sum(-1), (q * (lq - lp)).sum(-1)
    js = 0.5 * (p * (lp - lm)).sum(-1) + 0.5 * (q * (lq - lm)).sum(-1)
    return torch.stack([js, kl_pq, kl_qp]).cpu().numpy()


def rel_errors(got: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    """Max relative (to max(ref, :data:`REL_FLOOR`)) and max absolute error of JS (row 0)
    and KL (rows 1 and 2, both directions)."""
    err = np.abs(np.asarray(got, np.float64) - ref)
    rel = err / np.maximum(np.abs(ref), REL_FLOOR)
    return {
        "js_max_rel_err": float(rel[0].max()),
        "kl_max_rel_err": float(rel[1:].max()),
        "js_max_abs_err": float(err[0].max()),
        "kl_max_abs_err": float(err[1:].max()),
    }


def diff_accuracy(models: dict[str, tuple[Any, Any]], pairs: list[PromptPair]) -> dict:
    """Per position: score_prompt_pair in each dtype against the float64 reference."""
    a64, b64 = models["float64"]
    ref = []
    for pair in pairs:
        for side in "ab":
            for r in pair.responses[side]:
                la, lb = (
                    reference_logprobs(a64, pair.prompt_a, r),
                    reference_logprobs(b64, pair.prompt_b, r),
                )
                ref.append(reference_divergences(la, lb))
    ref = np.concatenate(ref, 1)  # (3, positions): JS, KL(A||B), KL(B||A)
    out = {"reference_median": {"js": float(np.median(ref[0])), "kl": float(np.median(ref[1]))}}
    for d in ("float32", "bfloat16"):
        got = [score_prompt_pair(*models[d], pair) for pair in pairs]
        vals = [
            np.stack([u.sides[s].js, u.sides[s].kl_ab, u.sides[s].kl_ba]) for u in got for s in "ab"
        ]
        out[d] = rel_errors(np.concatenate(vals, 1), ref)
    return out


def persona_accuracy(models: dict[str, tuple[Any, Any]], unit: QuestionUnit) -> dict:
    """Per sequence (mean over positions): score_question in each dtype against float64."""
    m64 = models["float64"][0]
    ref = np.zeros((3, 0))
    for g, r in sorted(unit.responses.items()):
        lp = [reference_logprobs(m64, p, r) for p in unit.prompts]
        rows = [reference_divergences(lp[g], lp[o]).mean(1) for o in range(len(lp)) if o != g]
        ref = np.concatenate([ref, np.stack(rows, 1)], 1)
    out = {"reference_median": {"js": float(np.median(ref[0])), "kl": float(np.median(ref[1]))}}
    for d in ("float32", "bfloat16"):
        scores = score_question(models[d][0], unit, persona_batch=PERSONA_BATCH, pad_id=0)
        n = len(unit.prompts)
        vals = [
            np.stack([s.js, s.kl_fwd, s.kl_rev])[:, [o for o in range(n) if o != g]]
            for g, s in sorted(scores.items())
        ]
        out[d] = rel_errors(np.concatenate(vals, 1), ref)
    return out


def section_accuracy(run: Run) -> dict[str, Any]:
    """A small random config (bf16 weights: every dtype holds exactly the same values, as when
    a bf16 checkpoint is loaded) with a realistic logit spread; B = A perturbed."""
    shape = run.plan.small
    a = build_model(shape, torch.bfloat16, run.device, seed=4)
    with torch.no_grad():
        init_std = a.config.initializer_range * math.sqrt(shape["hidden_size"])
        a.get_output_embeddings().weight.mul_(LOGIT_STD / init_std)
    b = perturbed(a, PERTURB, seed=5)
    models = {
        d: (with_dtype(a, getattr(torch, d)), with_dtype(b, getattr(torch, d)))
        for d in ("float64", "float32", "bfloat16")
    }
    vocab, gen = shape["vocab_size"], torch.Generator().manual_seed(6)
    plan = Plan(shape, shape, shape, torch.bfloat16, prompt_tokens=40, diff_prompt_tokens=24,
                diff_tokens=32)  # fmt: skip
    diff = diff_accuracy(models, diff_pairs(plan, vocab, gen, 2, 2))
    persona = persona_accuracy(models, persona_unit(plan, vocab, gen, 4, 32))
    return {
        "headline": {
            f"gpu_{short}_{q}_max_rel_err": diff[d][f"{q}_max_rel_err"]
            for d, short in (("float32", "fp32"), ("bfloat16", "bf16"))
            for q in ("js", "kl")
        },
        "means": "diff scorer per position (headline) and persona scorer per sequence, each "
        f"against a float64 forward of the same weights; relative to max(ref, {REL_FLOOR} nats)",
        "config": shape,
        "diff_per_position": diff,
        "persona_per_sequence": persona,
    }


def section_generate(run: Run) -> dict[str, Any]:
    """transformers' generate on the 7B-shaped model, exact sampling, fixed lengths."""
    plan, model = run.plan, run.big()
    knobs = {"do_sample": True, "top_k": 0, "top_p": 1.0, "temperature": 1.0}
    gen = torch.Generator().manual_seed(7)

    def generate(batch: int, new: int) -> torch.Tensor:
        ids = torch.randint(
            1, model.config.vocab_size, (batch, plan.gen_prompt_tokens), generator=gen
        )
        ids = ids.to(run.device)
        return model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
            min_new_tokens=new, pad_token_id=0, **knobs,
        )  # fmt: skip

    generate(2, 4)  # warm-up
    rates, seconds = {}, {}
    for batch in plan.gen_batches:
        s, out = best_time(lambda b=batch: generate(b, plan.gen_new_tokens), run.device, 1, 0.0)
        if out.shape != (batch, plan.gen_prompt_tokens + plan.gen_new_tokens):
            raise RuntimeError(f"generate returned shape {tuple(out.shape)} at batch {batch}")
        rates[batch], seconds[batch] = batch * plan.gen_new_tokens / s, s
    return {
        "headline": {f"gpu_generate_tokens_per_s_b{b}": r for b, r in rates.items()},
        "sampling": knobs,
        "prompt_tokens": plan.gen_prompt_tokens,
        "new_tokens": plan.gen_new_tokens,
        "seconds": seconds,
        "tokens_per_s_means": "generated tokens (batch x new tokens) / s, prefill included",
        "vllm_importable": importlib.util.find_spec("vllm") is not None,
        "vllm_note": "vLLM is the GPU backend for generation; it cannot be pip-installed on a "
        "machine without network, so transformers' generate is the baseline measured here",
    }


def layers_work(model_a: Any, model_b: Any, pairs: list[PromptPair]) -> float:
    """:func:`divscope.diff.layers.score_layers` (the ``--layers`` unit, on A's samples) on
    every pair; returns the FLOPs of the block evaluations and heads it ran
    (:func:`benchmarks.bench_teacher_force.layer_flops`, the count behind bench_layers'
    ``layers_fraction_of_matmul_peak``)."""
    from benchmarks.bench_teacher_force import layer_flops
    from divscope.diff.layers import score_layers

    for p in pairs:
        score_layers(model_a, model_b, p.prompt_a, p.responses["a"])
    return layer_flops(model_a, pairs)


def section_layers(run: Run) -> dict[str, Any]:
    """The --layers decomposition on a Qwen2.5-1.5B-shaped pair (B = A perturbed)."""
    plan = run.plan
    run.free()  # the 7B-shaped models
    a = build_model(plan.pair, plan.dtype, run.device, seed=8)
    b = perturbed(a, PERTURB, seed=9)
    gen = torch.Generator().manual_seed(10)
    layers_work(a, b, diff_pairs(plan, a.config.vocab_size, gen, 1, 1))  # warm-up
    pairs = diff_pairs(plan, a.config.vocab_size, gen, 2, plan.diff_samples)
    with PeakMemory(run.device) as mem:
        seconds, work = best_time(
            lambda: layers_work(a, b, pairs), run.device, 2, plan.budget_s["layers"]
        )
    score_prompt_pair(a, b, pairs[0])  # warm-up: the plain diff compiles its own fused kernel
    plain, _ = best_time(lambda: [score_prompt_pair(a, b, p) for p in pairs], run.device, 2, 0.0)
    return {
        "headline": {"gpu_layers_mfu": work / seconds / (run.peak(plan.dtype) * 1e9)},
        "seconds": seconds,
        "cost_ratio_vs_plain_diff": seconds / plain,
        "n_layers": a.config.num_hidden_layers,
        "peak_mem_gb": mem.peak_gb,
    }


SECTION_FUNCS: dict[str, Callable[[Run], dict[str, Any]]] = {
    "peaks": section_peaks,
    "accuracy": section_accuracy,
    "persona": section_persona,
    "diff": section_diff,
    "generate": section_generate,
    "layers": section_layers,
}


# ---------------------------------------------------------------------------------------
# driver


def device_info(device: torch.device) -> dict[str, Any]:
    """:func:`divscope.runmeta.device_info` plus the device's name and memory, the CUDA and
    transformers versions."""
    import transformers

    info = run_device_info()
    info.update(type=device.type, transformers=transformers.__version__)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(
            name=props.name, memory_gb=props.total_memory / 1e9, cuda_version=torch.version.cuda
        )
    return info


def headline(sections: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The top-level keys: every :data:`HEADLINE_KEYS` entry (None until a section fills it)."""
    out: dict[str, Any] = dict.fromkeys(HEADLINE_KEYS)
    for details in sections.values():
        out.update(details.get("headline", {}))
    return out


def read_previous(path: Path, device: str, tiny: bool) -> dict[str, Any]:
    """The sections of an earlier run's result file on the same device (empty when there is
    none); ValueError when the file is not one, or holds another device's results."""
    if not path.exists():
        return {}
    try:
        old = json.loads(path.read_text())
        sections, where = dict(old["sections"]), (old["device"], old["tiny"])
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path} exists and is not a gpu_check result ({e})") from e
    if where != (device, tiny):
        raise ValueError(f"{path} holds results from {where[0]} (tiny={where[1]}), not {device}")
    return sections


def table(result: dict[str, Any]) -> str:
    """The headline as a short two-column table (plain text)."""
    rows = [(k, v) for k, v in result.items() if k in HEADLINE_KEYS]
    rows += [(f"{name} seconds", s.get("elapsed_s")) for name, s in result["sections"].items()]
    rows += [
        (f"{name} ERROR", s["error"]) for name, s in result["sections"].items() if "error" in s
    ]

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return "-" if v is None else str(v)

    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {fmt(v)}" for k, v in rows)


def run_sections(
    run: Run, names: list[str], path: Path, base: dict[str, Any], sections: dict[str, Any]
) -> dict[str, Any]:
    """Run ``names`` in order, rewriting ``path`` after each (``sections``: an earlier run's,
    kept unless rerun); a failing section records its error (and frees the models, in case
    memory was the problem) and the next one runs."""
    t_start = time.perf_counter()
    result: dict[str, Any] = {}
    for name in names:
        t0 = time.perf_counter()
        try:
            details = SECTION_FUNCS[name](run)
        except Exception as e:  # noqa: BLE001 - recorded; the other sections still run
            details = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
            run.free()
        details["elapsed_s"] = time.perf_counter() - t0
        details["device"] = base["device_info"].get("name", run.device.type)
        sections[name] = details
        result = {**headline(sections), **base, "sections": sections}
        result["total_s"] = time.perf_counter() - t_start
        write_result(path, result)
        status = "failed: " + details["error"] if "error" in details else "done"
        print(f"[gpu_check] {name}: {status} in {details['elapsed_s']:.1f} s "
              f"(total {result['total_s']:.1f} s)", flush=True)  # fmt: skip
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="folder for gpu_check.json")
    ap.add_argument("--sections", default=",".join(SECTIONS), help=f"some of {','.join(SECTIONS)}")
    ap.add_argument("--tiny", action="store_true", help="tiny configs on CPU (the test suite)")
    args = ap.parse_args(argv)
    names = [s.strip() for s in args.sections.split(",") if s.strip()]
    if not names or any(s not in SECTIONS for s in names):
        return fail(f"--sections {args.sections!r}: choose from {','.join(SECTIONS)}")
    if not args.tiny and not torch.cuda.is_available():
        return fail("no CUDA device here; --tiny runs the same code on CPU")
    device = torch.device("cpu") if args.tiny else torch.device("cuda", torch.cuda.current_device())
    info = device_info(device)
    path = Path(args.out) / RESULT_FILE
    try:
        previous = read_previous(path, info.get("name", "cpu"), args.tiny)
    except ValueError as e:
        return fail(f"{e}; choose another --out")
    # fp32 means fp32: the scorers' fp32 output projection and the fp32 peak, TF32 off
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    torch.set_grad_enabled(False)
    if args.tiny:  # tiny matmuls gain nothing from threads, and on a busy machine they wait
        torch.set_num_threads(1)
    base = {
        "device": info.get("name", "cpu"),
        "tiny": args.tiny,
        "cpu_threads": torch.get_num_threads(),
        "flop_formula": FLOP_FORMULA,
        "mfu_means": "model FLOPs / seconds / matmul peak measured in this run at the model dtype",
        "device_info": info,
        "machine": machine_info(),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    plan = TINY_PLAN if args.tiny else GPU_PLAN
    result = run_sections(Run(plan, device), names, path, base, previous)
    print(table(result), flush=True)
    return 0


def fail(message: str) -> int:
    """One line on stderr and exit status 2 (nothing written)."""
    print(f"gpu_check: {message}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
