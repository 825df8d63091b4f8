"""benchmarks/gpu_check.py stays runnable before a GPU is at hand: ``--tiny`` runs every
section on CPU, in an environment that holds only what the GPU image holds (torch,
transformers, peft, numpy, pandas and what they require), and writes a complete result."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
IMAGE = ("torch", "transformers", "peft", "numpy", "pandas")  # what a GPU image brings
# divscope's other dependencies and extras, none of which the image has
NOT_ON_IMAGE = (
    "scipy", "matplotlib", "seaborn", "ipykernel", "ipywidgets", "ray", "vllm", "llama_cpp",
    "gguf", "pytest", "hypothesis",
)  # fmt: skip


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def image_distributions() -> dict[str, metadata.Distribution]:
    """The installed distributions of :data:`IMAGE` and everything they require (no extras)."""
    from packaging.requirements import Requirement

    installed = {_norm(d.metadata["Name"]): d for d in metadata.distributions()}
    todo, out = [_norm(n) for n in IMAGE], {}
    while todo:
        name = todo.pop()
        if name in out or name not in installed:
            continue
        out[name] = installed[name]
        for req in out[name].requires or []:
            r = Requirement(req)
            if r.marker is None or r.marker.evaluate({"extra": ""}):
                todo.append(_norm(r.name))
    return out


def image_site(tmp: Path) -> Path:
    """A folder that holds only the image's distributions (links into site-packages)."""
    site = tmp / "site"
    site.mkdir()
    for dist in image_distributions().values():
        for top in {f.parts[0] for f in dist.files or [] if f.parts[0] != ".."}:
            src = Path(dist.locate_file(top))
            if src.exists() and not (site / top).exists():
                (site / top).symlink_to(src)
    return site


RUNNER = """
import json, runpy, sys
out, modules = sys.argv[1:3]
sys.argv = ["gpu_check", "--tiny", "--out", out]
code = 0
try:
    runpy.run_module("benchmarks.gpu_check", run_name="__main__", alter_sys=True)
except SystemExit as e:
    code = e.code
with open(modules, "w") as f:
    json.dump(sorted(sys.modules), f)
sys.exit(code)
"""


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> tuple[dict, list[str], subprocess.CompletedProcess]:
    """``--tiny`` under ``python -S`` (no site-packages) with only the image's packages."""
    tmp = tmp_path_factory.mktemp("gpu_check")
    site = image_site(tmp)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(ROOT / "src")])}
    out, modules = tmp / "out", tmp / "modules.json"
    proc = subprocess.run(
        [sys.executable, "-S", "-c", RUNNER, str(out), str(modules)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / "gpu_check.json").read_text()), json.loads(modules.read_text()), proc


def test_image_environment_lacks_divscope_only_dependencies(tmp_path):
    site = image_site(tmp_path)
    names = {p.name for p in site.iterdir()}
    assert {"torch", "transformers", "numpy"} <= names
    assert not names & set(NOT_ON_IMAGE)  # the run below cannot import them


def test_tiny_run_writes_every_headline_key(tiny_run):
    from benchmarks.gpu_check import HEADLINE_KEYS, SECTIONS

    result, _, proc = tiny_run
    assert list(result)[: len(HEADLINE_KEYS)] == list(HEADLINE_KEYS)  # headline first
    assert set(result["sections"]) == set(SECTIONS)
    assert not [s for s in result["sections"].values() if "error" in s]
    assert result["device"] == "cpu" and result["tiny"] is True
    assert "4 x layers x heads x head_dim" in result["flop_formula"]
    for key in HEADLINE_KEYS:
        assert key in proc.stdout  # the printed table names every headline key


def test_tiny_run_figures_are_plausible(tiny_run):
    r, _, _ = tiny_run
    for key in ("gpu_persona_mfu", "gpu_diff_mfu"):
        assert math.isfinite(r[key]) and 0 < r[key] < 1.5, (key, r[key])
    for key in ("gpu_bf16_peak_tflops", "gpu_fp32_peak_tflops", "gpu_persona_tokens_per_s"):
        assert r[key] > 0
    for b in (1, 16, 64):
        assert r[f"gpu_generate_tokens_per_s_b{b}"] > 0
    # fp32 scoring agrees with a float64 forward; bf16 is off by more, but not wildly
    assert r["gpu_fp32_js_max_rel_err"] < 1e-3 and r["gpu_fp32_kl_max_rel_err"] < 1e-3
    assert r["gpu_fp32_kl_max_rel_err"] < r["gpu_bf16_kl_max_rel_err"] < 1.0
    persona = r["sections"]["accuracy"]["persona_per_sequence"]["float32"]
    assert persona["js_max_rel_err"] < 1e-3 and persona["kl_max_rel_err"] < 1e-3
    assert r["sections"]["persona"]["all_finite"] and r["sections"]["diff"]["all_finite"]
    assert set(r["sections"]["diff"]["fused_compiled"]) >= {"_position_terms_logits"}
    layers = r["sections"]["layers"]
    assert 0 < r["gpu_layers_mfu"] < 1.5, layers.get("reason") or layers.get("error")
    assert layers["n_layers"] >= 1 and layers["cost_ratio_vs_plain_diff"] > 0


def test_tiny_run_imports_only_what_the_image_has(tiny_run):
    _, modules, _ = tiny_run
    top = {m.split(".")[0] for m in modules}
    assert not top & set(NOT_ON_IMAGE)
    assert {"divscope", "transformers", "torch"} <= top


def test_flop_count_matches_a_brute_force_count():
    """The persona scorer's FLOPs, counted position by position in the test."""
    from transformers import Qwen2Config

    from benchmarks.gpu_check import TINY, persona_flops
    from divscope.personas.units import QuestionUnit

    class Fake:  # flops() reads the config and the embedding shapes only
        config = Qwen2Config(**TINY)

        def __init__(self) -> None:
            import torch

            v, h = self.config.vocab_size, self.config.hidden_size
            self.emb, self.head = torch.nn.Embedding(v, h), torch.nn.Linear(h, v, bias=False)
            self.body = torch.nn.Linear(h, 7, bias=False)  # 7h "non-embedding" parameters

        def get_input_embeddings(self):
            return self.emb

        def get_output_embeddings(self):
            return self.head

        def parameters(self):
            return [self.emb.weight, self.head.weight, self.body.weight]

    m = Fake()
    h, v = TINY["hidden_size"], TINY["vocab_size"]
    att = 4 * TINY["num_hidden_layers"] * TINY["hidden_size"]  # heads x head_dim = hidden
    unit = QuestionUnit([[1] * 5, [1] * 7], {0: [2] * 4, 1: [3] * 3}, None, [])
    want = 0.0
    for p in unit.prompts:  # each prompt once
        want += sum(2 * 7 * h + att * (i + 1) for i in range(len(p)))
    for r in unit.responses.values():  # each response but its last token after each prompt
        for p in unit.prompts:
            want += sum(2 * 7 * h + att * (len(p) + j + 1) for j in range(len(r) - 1))
            want += len(r) * 2 * h * v  # every position through the head
    total, head = persona_flops(m, unit)
    assert total == pytest.approx(want)
    assert head == pytest.approx(2 * h * v * (4 + 3) * 2)


def test_bad_sections_and_no_cuda_refused_in_one_line(tmp_path, capsys):
    from benchmarks import gpu_check

    assert gpu_check.main(["--out", str(tmp_path), "--sections", "persona,bogus"]) == 2
    err = capsys.readouterr().err
    assert "choose from peaks,accuracy" in err and err.count("\n") == 1
    if not __import__("torch").cuda.is_available():
        assert gpu_check.main(["--out", str(tmp_path)]) == 2
        assert "--tiny" in capsys.readouterr().err
    (tmp_path / "gpu_check.json").write_text("{not json")
    assert gpu_check.main(["--tiny", "--out", str(tmp_path), "--sections", "peaks"]) == 2
    assert "not a gpu_check result" in capsys.readouterr().err
    assert (tmp_path / "gpu_check.json").read_text() == "{not json"  # nothing written


def test_rerun_of_some_sections_keeps_the_others(tmp_path):
    def run(sections: str) -> dict:
        subprocess.run(
            [sys.executable, "-m", "benchmarks.gpu_check", "--tiny", "--out", str(tmp_path),
             "--sections", sections],
            cwd=ROOT, check=True, capture_output=True, timeout=300,
            env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
        )  # fmt: skip
        return json.loads((tmp_path / "gpu_check.json").read_text())

    first = run("peaks")
    second = run("layers")
    assert set(second["sections"]) == {"peaks", "layers"}
    assert second["sections"]["peaks"] == first["sections"]["peaks"]
    assert second["gpu_bf16_peak_tflops"] == first["gpu_bf16_peak_tflops"]
    assert second["gpu_persona_mfu"] is None  # never run: present, empty


def test_failing_section_is_recorded_and_the_file_written_after_each(tmp_path, monkeypatch):
    import torch

    from benchmarks import gpu_check as g

    path = tmp_path / "gpu_check.json"
    seen = {}

    def boom(run):
        raise RuntimeError("CUDA out of memory (simulated)")

    def peaks(run):  # runs second: the first section's result is already on disk
        seen["before"] = json.loads(path.read_text())
        return {"headline": {"gpu_bf16_peak_tflops": 1.0}}

    monkeypatch.setitem(g.SECTION_FUNCS, "persona", boom)
    monkeypatch.setitem(g.SECTION_FUNCS, "peaks", peaks)
    base = {"device": "cpu", "tiny": True, "device_info": {}}
    g.run_sections(g.Run(g.TINY_PLAN, torch.device("cpu")), ["persona", "peaks"], path, base, {})
    assert "out of memory" in seen["before"]["sections"]["persona"]["error"]
    final = json.loads(path.read_text())
    assert "RuntimeError: CUDA out of memory" in final["sections"]["persona"]["error"]
    assert final["gpu_bf16_peak_tflops"] == 1.0 and final["gpu_persona_mfu"] is None
