"""The CLI on a user's mistakes: one clear line on stderr, exit 2, nothing half-written."""

from __future__ import annotations

import shutil

import pytest
from conftest import DATA, ROOT

from divscope.cli import main

REF = DATA / "reference_qwen7b"


def _one_error_line(capsys, *needles: str) -> str:
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("divscope: error: "), err
    assert "Traceback" not in err and all(n in lines[0] for n in needles), err
    return lines[0]


def test_report_on_the_published_reference_directory(tmp_path, capsys):
    """`analyze` reads the reference's files; `report` does too (it crashed with KeyError)."""
    run = tmp_path / "ref"
    shutil.copytree(REF, run)
    assert main(["report", str(run)]) == 0
    html = (run / "report.html").read_text()
    assert "Qwen/Qwen2.5-7B-Instruct" in html and "software_engineer" in html
    assert "recomputed signed from kl_matrix" in html and "centred cosine" in html


def test_analyze_missing_leakage_file(tmp_path, capsys):
    args = ["analyze", "--matrices", str(REF / "divergence_matrices.json")]
    assert main([*args, "--leakage", str(tmp_path / "nope.csv")]) == 2
    _one_error_line(capsys, "nope.csv", "no such file")


def test_analyze_refuses_a_cosine_file_it_would_ignore(capsys):
    args = ["analyze", "--matrices", str(REF / "divergence_matrices.json"), "--n-permutations", "9"]
    assert main([*args, "--cosine", str(REF / "cosine_leakage_correlation.json")]) == 2
    _one_error_line(capsys, "cosine_leakage_correlation.json", "--leakage")
    assert main([*args, "--cosine", str(REF / "cosine_11_l20.json")]) == 0
    out = capsys.readouterr().out
    assert "redundancy with cosine" in out and "centred/layer_20" in out


def test_analyze_refuses_a_cosine_matrix_of_other_personas(tmp_path, capsys):
    import json

    d = json.loads((REF / "cosine_11_l20.json").read_text())
    keep = [i for i, n in enumerate(d["persona_names"]) if n != "villain"]
    d["persona_names"] = [d["persona_names"][i] for i in keep]
    d["cosine_matrix_l20"] = [[d["cosine_matrix_l20"][i][j] for j in keep] for i in keep]
    bad = tmp_path / "cos.json"
    bad.write_text(json.dumps(d))
    assert main(["analyze", "--matrices", str(REF / "divergence_matrices.json"),
                 "--cosine", str(bad)]) == 2  # fmt: skip
    _one_error_line(capsys, "cos.json", "missing: villain")


def test_personas_more_than_the_file_holds(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["personas", "--n-personas", "50", "--out", str(out),
                 "--personas", str(ROOT / "data/personas/core.yaml")]) == 2  # fmt: skip
    _one_error_line(capsys, "50", "has 12", "core.yaml")
    assert not out.exists()


def test_personas_layers_not_indices_or_out_of_range(tmp_path, capsys):
    """--layers that are not integers: argparse's refusal (exit 2); indices past the model's
    blocks: one line naming the range and a fix, after the model loads (it knows the range)."""
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        main(["personas", "--layers", "8,x", "--out", str(out)])
    assert e.value.code == 2 and "not a comma-separated list" in capsys.readouterr().err
    assert main(["personas", "--layers", "8,99", "--n-personas", "2", "--n-questions", "1",
                 "--quiet", "--out", str(out)]) == 2  # fmt: skip
    _one_error_line(capsys, "layers [8, 99]", "0..30", "Fix: e.g. --layers 8,15,22,30")
    assert not out.exists()


def test_personas_cuda_without_cuda(tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    out = tmp_path / "out"
    assert main(["personas", "--device", "cuda", "--n-personas", "2", "--out", str(out),
                 "--personas", str(ROOT / "data/personas/core.yaml")]) == 2  # fmt: skip
    _one_error_line(capsys, "'cuda'", "without CUDA", "available here: cpu")
    assert not out.exists()


SHIPPED = ROOT / "data/samples/smollm2_vs_gemma3"


def test_topk_metric_on_two_tokenizers_gives_the_true_reason(tmp_path, capsys):
    """The shipped pair has cross-scores, but two tokenizers: the top-k bounds (one
    vocabulary's next-token distributions) do not exist, and re-sampling would not help."""
    import json

    files = [str(SHIPPED / "smollm2-135m-instruct.jsonl"), str(SHIPPED / "gemma-3-270m.jsonl")]
    args = ["rank", *files, "--n-bootstrap", "20"]
    assert main([*args, "--metric", "topk_kl_lb"]) == 2
    line = _one_error_line(capsys, "tokenizers differ", "re-sampling would not help")
    assert "cross_score: true" not in line
    out = tmp_path / "r.json"
    assert main([*args, "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert not any(m.startswith("topk") for m in doc["available_metrics"])
    assert not any(k.startswith("topk") for p in doc["prompts"] for k in p["scores"])
    assert any("top-k bounds" in n for n in doc["notes"])


# ---------------------------------------------------------------------------- help and options


def _subparsers():
    import argparse

    from divscope.cli import build_parser

    p = build_parser()
    sub = next(a for a in p._actions if isinstance(a, argparse._SubParsersAction))
    return p, sub.choices


def test_help_lists_every_command_without_markup(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for cmd in ("rank", "sample", "personas", "diff", "analyze", "report", "convert"):
        assert f"\n    {cmd} " in out, cmd
    assert "``" not in out and "`" not in out


def test_every_option_has_help_and_its_default():
    import argparse

    _, commands = _subparsers()
    for name, parser in commands.items():
        assert parser.description, name
        text = parser.format_help()
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            assert action.help, (name, action.dest)
            d = action.default
            if d is not None and d is not False and action.option_strings and d != []:
                assert f"(default: {d})" in " ".join(text.split()), (name, action.dest)


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--top", "0"], "--top: must be at least 1 (got 0)"),
        (["--top", "-1"], "--top: must be at least 1 (got -1)"),
        (["--max-prompts", "0"], "--max-prompts: must be at least 1 (got 0)"),
        (["--n-bootstrap", "x"], "'x' is not an integer"),
    ],
)
def test_rank_refuses_counts_below_one(args, needle, capsys):
    from conftest import GEMMA_JSON, PKL

    with pytest.raises(SystemExit) as e:
        main(["rank", str(PKL), str(GEMMA_JSON), *args])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err


def test_convert_refuses_an_output_extension_it_would_not_write(tmp_path, capsys):
    from conftest import PKL

    out = tmp_path / "out.csv"
    assert main(["convert", str(PKL), str(out)]) == 2
    _one_error_line(capsys, "out.csv", ".jsonl", ".npz", "out.jsonl")
    assert not out.exists() and not list(tmp_path.iterdir())


def test_report_on_a_file_says_to_pass_its_directory(tmp_path, capsys):
    rank_json = tmp_path / "run" / "ranking.json"
    rank_json.parent.mkdir()
    rank_json.write_text("{}")
    assert main(["report", str(rank_json)]) == 2
    _one_error_line(capsys, "is a file", f"pass its directory, {rank_json.parent}")
    assert main(["report", str(tmp_path / "nope")]) == 2
    _one_error_line(capsys, "no such directory")


def test_shipped_inputs_are_package_data():
    """The repository's data/ files are the package's (one copy), so the CLI's defaults work
    from any directory; pyproject ships them."""
    import os

    from divscope import defaults

    for link, target in (
        ("data/personas/core.yaml", defaults.PERSONAS),
        ("data/questions/eval20.yaml", defaults.QUESTIONS),
        ("data/prompts/prompts.jsonl", defaults.PROMPTS),
    ):
        assert os.path.samefile(ROOT / link, target), link
    assert '"divscope.defaults" = ["*.yaml", "*.jsonl"]' in (ROOT / "pyproject.toml").read_text()


@pytest.mark.slow
def test_personas_runs_from_any_directory_with_the_shipped_inputs(tmp_path):
    """`divscope personas` without --personas/--questions, from a directory without data/;
    --quiet shows no progress bar (transformers' weight loading included)."""
    import json
    import os
    import subprocess
    import sys

    # an empty model cache, as on a new machine: the first run converts the GGUF (quietly too)
    cache = tmp_path / "empty_cache"
    env = dict(os.environ, HF_HUB_OFFLINE="1", MPLBACKEND="Agg", DIVSCOPE_CACHE=str(cache))
    proc = subprocess.run(
        [sys.executable, "-m", "divscope", "personas", "--n-personas", "2", "--n-questions",
         "1", "--max-new-tokens", "4", "--explain-pairs", "0", "--out", "out", "--quiet"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (cache / "models" / "smollm2-135m-instruct" / "divscope.json").is_file()
    assert "Converting" not in proc.stderr, proc.stderr[-500:]
    assert "Loading weights" not in proc.stderr and "it/s" not in proc.stderr  # --quiet
    assert "deprecated" not in proc.stderr, proc.stderr
    mats = json.loads((tmp_path / "out" / "divergence_matrices.json").read_text())
    assert mats["personas"] == ["assistant", "villain"] and mats["checks"]["all_ok"]
