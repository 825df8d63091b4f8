"""Shared fixtures: paths to the real sample files and builders of synthetic distributions."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(__file__).resolve().parent / "data"
PKL = DATA / "cloud_20251013_094801.pkl"
GEMMA_JSON = DATA / "google_gemma-2-9b-it_20251012_185239.json"
EMPTY_JSON = DATA / "meta-llama_llama-3.1-8b-instruct_20251012_145148.json"


@pytest.fixture
def real_pair() -> tuple[Path, Path]:
    return PKL, GEMMA_JSON


def random_logprobs(rng: np.random.Generator, shape: tuple[int, ...], scale: float = 2.0):
    """Log-softmax of Gaussian logits over the last axis (float64)."""
    z = rng.normal(scale=scale, size=shape)
    return z - np.logaddexp.reduce(z, axis=-1, keepdims=True)


def columns(tokens_idx, logp_full, k: int) -> dict:
    """divscope column-wise scores of the token indices under full distributions (T, V)."""
    t = np.arange(len(tokens_idx))
    order = np.argsort(-logp_full, axis=1)[:, :k]
    return {
        "tokens": [f"t{j}" for j in tokens_idx],
        "logprobs": logp_full[t, tokens_idx].tolist(),
        "top_tokens": [[f"t{j}" for j in row] for row in order],
        "top_logprobs": np.take_along_axis(logp_full, order, 1).tolist(),
    }


def synthetic_pair(
    tmp_path: Path,
    *,
    n_prompts: int = 3,
    n_resp: int = 4,
    length: int = 12,
    vocab: int = 30,
    k: int = 5,
    same: bool = False,
    seed: int = 0,
) -> tuple[Path, Path, dict]:
    """Two divscope JSONL files with full cross-scores from known per-position distributions.

    Each response of model X is sampled from X's distributions; both models' full
    log-probabilities at each position are kept in ``truth`` for brute-force checks.
    With ``same=True`` both models share the same distributions (all divergences 0).
    """
    rng = np.random.default_rng(seed)
    truth: dict = {"A": [], "B": []}
    recs: dict = {"A": [], "B": []}
    for i in range(n_prompts):
        la = random_logprobs(rng, (length, vocab))
        lb = la.copy() if same else random_logprobs(rng, (length, vocab))
        per_model = {"A": (la, lb, "model-b"), "B": (lb, la, "model-a")}
        for name, (own, other, other_name) in per_model.items():
            responses, full = [], []
            for _ in range(n_resp):
                x = np.array([rng.choice(vocab, p=np.exp(row)) for row in own])
                responses.append(
                    {
                        "text": "".join(f"t{j}" for j in x),
                        "finish_reason": "length",
                        "logprobs": columns(x, own, k),
                        "cross_scores": {other_name: {"aligned": True, **columns(x, other, k)}},
                    }
                )
                full.append((x, own, other))
            truth[name].append(full)
            recs[name].append(
                {
                    "format": "divscope.samples/1",
                    "index": i,
                    "prompt": f"prompt {i}",
                    "category": ["c1", "c2"][i % 2],
                    "model": "model-a" if name == "A" else "model-b",
                    "responses": responses,
                }
            )
    paths = []
    for name in ("A", "B"):
        p = tmp_path / f"{name}.jsonl"
        p.write_text("\n".join(json.dumps(r) for r in recs[name]) + "\n")
        paths.append(p)
    return paths[0], paths[1], truth
