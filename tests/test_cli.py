"""`divscope rank` end to end: table, JSON document, exit codes."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys

import pytest
from conftest import EMPTY_JSON, GEMMA_JSON, PKL, synthetic_pair

from divscope.cli import main

KEYS = {"index", "prompt", "rank", "scores", "ci", "coverage", "n_responses", "excluded_responses"}


def test_rank_real_files_json(tmp_path, capsys):
    out = tmp_path / "r.json"
    assert (
        main(["rank", str(PKL), str(GEMMA_JSON), "--json", str(out), "--n-bootstrap", "200"]) == 0
    )
    printed = capsys.readouterr().out
    assert "legacy_aligned" in printed and "no honest KL estimate" in printed
    assert "what are you?" in printed
    doc = json.loads(out.read_text())
    assert doc["metric"] == "legacy_aligned"
    assert doc["models"] == ["cloud", "google/gemma-2-9b-it"]
    assert len(doc["prompts"]) == 2
    for p in doc["prompts"]:
        assert set(p) >= KEYS
        assert p["n_responses"] == [10, 5] and p["excluded_responses"] == [0, 0]
        assert set(p["scores"]) == {"legacy_aligned", "legacy_aligned_ab", "legacy_aligned_ba"}
    assert sorted(p["rank"] for p in doc["prompts"]) == [1, 2]
    best = min(doc["prompts"], key=lambda p: p["rank"])
    assert all(
        best["scores"]["legacy_aligned"] >= p["scores"]["legacy_aligned"] for p in doc["prompts"]
    )


def test_rank_never_overwrites_silently(tmp_path, capsys):
    out = tmp_path / "r.json"
    out.write_text("my results")
    assert main(["rank", str(PKL), str(GEMMA_JSON), "--json", str(out)]) == 2
    assert out.read_text() == "my results"
    assert "--overwrite" in capsys.readouterr().err
    assert main(["rank", str(PKL), str(GEMMA_JSON), "--json", str(out), "--overwrite"]) == 0
    assert json.loads(out.read_text())["metric"] == "legacy_aligned"


def test_rank_top_and_max_prompts(tmp_path, capsys):
    fa, fb, _ = synthetic_pair(tmp_path, n_prompts=6, n_resp=2)
    out = tmp_path / "r.json"
    assert (
        main(
            [
                "rank",
                str(fa),
                str(fb),
                "--top",
                "2",
                "--max-prompts",
                "4",
                "--json",
                str(out),
                "--n-bootstrap",
                "50",
            ]
        )
        == 0
    )
    table = capsys.readouterr().out
    doc = json.loads(out.read_text())
    assert doc["metric"] == "mc_kl" and len(doc["prompts"]) == 4
    rows = [line for line in table.splitlines() if line.strip().startswith(("1 ", "2 ", "3 "))]
    assert len(rows) == 2  # --top 2


def test_rank_unscored_prompt_gets_null_rank_and_reason(tmp_path):
    fa, fb, _ = synthetic_pair(tmp_path, n_prompts=2, n_resp=2)
    recs = [json.loads(line) for line in fa.read_text().splitlines()]
    for r in recs[1]["responses"]:
        r["logprobs"] = None  # provider dropped logprobs for every response of prompt 1
    fa.write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    out = tmp_path / "r.json"
    assert main(["rank", str(fa), str(fb), "--json", str(out), "--n-bootstrap", "20"]) == 0
    p1 = json.loads(out.read_text())["prompts"][1]
    assert p1["rank"] is None and "no response of model A" in p1["reason"]
    assert p1["excluded_responses"] == [2, 0] and p1["scores"]["mc_kl"] is None


@pytest.mark.parametrize(
    "args,needle",
    [
        ([str(PKL), str(EMPTY_JSON)], "came back empty"),
        ([str(PKL), str(GEMMA_JSON), "--metric", "mc_kl"], "needs cross-scores"),
    ],
)
def test_rank_bad_input_exit_2(args, needle, capsys):
    assert main(["rank", *args]) == 2
    err = capsys.readouterr().err
    assert needle in err and "Fix:" in err


def test_rank_hostile_pickle_exit_2_and_nothing_runs(tmp_path):
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    evil = tmp_path / "evil.pkl"
    evil.write_bytes(pickle.dumps([{"prompt": "p", "model": "m", "responses": [Evil()]}]))
    proc = subprocess.run(
        [sys.executable, "-m", "divscope", "rank", str(evil), str(GEMMA_JSON)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and "refused" in proc.stderr and not marker.exists()


def test_console_script_and_convert(tmp_path):
    exe = os.path.join(os.path.dirname(sys.executable), "divscope")
    out = tmp_path / "cloud.jsonl"
    proc = subprocess.run([exe, "convert", str(PKL), str(out)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    proc = subprocess.run(
        [exe, "rank", str(out), str(GEMMA_JSON), "--n-bootstrap", "50"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0 and "what are you?" in proc.stdout


def test_rank_prints_control_characters_escaped(tmp_path, capsys):
    """ESC and other control characters in prompts and model names reach the terminal as
    escapes, never raw."""
    fa, fb, _ = synthetic_pair(tmp_path, n_prompts=2, n_resp=2)
    for f in (fa, fb):
        recs = [json.loads(x) for x in f.read_text().splitlines()]
        for r in recs:
            r["prompt"] = "evil \x1b[2J\x1b]0;title\x07 prompt"
            r["model"] = r["model"] + "\x1b[31m"
        f.write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    assert main(["rank", str(fa), str(fb), "--n-bootstrap", "20"]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\x07" not in out
    assert "\\x1b[2J" in out and "\\x1b[31m" in out
