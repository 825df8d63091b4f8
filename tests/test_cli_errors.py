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
    assert "redundancy JS vs centred/layer_20" in capsys.readouterr().out


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
