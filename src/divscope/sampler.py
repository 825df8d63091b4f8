"""Sample responses with logprobs from OpenAI-compatible servers, and cross-score them.

``divscope sample --config CONFIG`` runs :class:`Sampler`. Work is one unit per prompt: every
model's samples for the prompt, then (``cross_score: true``) every model's log-probabilities
of every other model's responses. A finished unit is appended to each model's JSONL file and
flushed; a rerun of the same config finds the run directory again (by the config's
fingerprint) and does only the prompts that are missing. A prompt whose requests fail for
good is reported and left for the next run; nothing else is lost.

Cross-scoring renders the prompt with the scoring model's chat template, appends the
response text, and asks ``/completions`` for echo logprobs, with the end-of-sequence token
forced so the server generates nothing. The response's span is what the echo of the full
text adds to the echo of the prompt alone (the seam is checked: the prompt's tokens must be
a prefix). Before a run trusts a template, it checks that the model re-scoring one of its own
samples reproduces the logprobs it sampled with.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from divscope.client import APIError, OpenAIClient, RequestStats
from divscope.config import ConfigError, DatasetSpec, ModelSpec, SampleConfig
from divscope.runmeta import atomic_write_json, atomic_write_text, new_run_name, run_metadata
from divscope.samples import FORMAT
from divscope.templates import ChatTemplate, load_template

SEAM_TOLERANCE = 0.05  # nats: first-token logprob, own sample vs re-scored by echo
SEAM_JS_TOLERANCE = 2e-3  # nats: JS lower bound between those two first-position top-k


@dataclass
class PromptItem:
    """A prompt of the dataset; ``index`` is its position in the full prompt file."""

    index: int
    prompt: str
    id: str | None = None
    category: str | None = None


class SeamError(RuntimeError):
    """The echo of the prompt is not a prefix of the echo of prompt + response."""


# ------------------------------------------------------------------------ prompts


def load_prompts(ds: DatasetSpec, config_path: str | Path = "<config>") -> list[PromptItem]:
    """Read the prompt dataset (local .jsonl/.txt, or a Hugging Face dataset)."""
    if ds.source == "huggingface":
        try:
            import datasets  # noqa: PLC0415 - optional, needs a network
        except ImportError as e:
            raise ConfigError(
                config_path,
                "dataset.source",
                "huggingface needs `datasets`",
                "pip install datasets, or use source: local",
            ) from e
        rows = datasets.load_dataset(ds.name, split=ds.split)
        return [
            PromptItem(i, str(r[ds.prompt_field]), category=r.get("category"))
            for i, r in enumerate(rows)
        ]
    path = Path(ds.path)
    if not path.exists() and config_path != "<config>":
        path = Path(config_path).parent / ds.path
    if not path.exists():
        raise ConfigError(
            config_path,
            "dataset.path",
            f"{ds.path} does not exist",
            "give a prompts file relative to the working directory",
        )
    items = []
    if path.suffix == ".txt":
        lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()]
        return [PromptItem(i, ln) for i, ln in enumerate(x for x in lines if x)]
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(
                config_path,
                "dataset.path",
                f"{path} line {n} is not JSON ({e})",
                "fix the prompts file",
            ) from e
        if not isinstance(row, dict) or not isinstance(row.get(ds.prompt_field), str):
            raise ConfigError(
                config_path,
                "dataset.prompt_field",
                f"{path} line {n} has no string field {ds.prompt_field!r}",
                "fix the file or set dataset.prompt_field",
            )
        items.append(
            PromptItem(len(items), row[ds.prompt_field], row.get("id"), row.get("category"))
        )
    return items


def select_prompts(items: list[PromptItem], num: int | None, seed: int) -> list[PromptItem]:
    """A seeded random subset of ``num`` prompts, kept in file order (all when None)."""
    if num is None or num >= len(items):
        return list(items)
    chosen = sorted(random.Random(seed).sample(range(len(items)), num))
    return [items[i] for i in chosen]


# ------------------------------------------------------------------------ parsing


def f32(values: list) -> list:
    """Logprobs at float32 precision, which is what servers compute: each value becomes the
    float whose shortest decimal round-trips the same float32 (None stays None). Halves the
    size of the JSON against printing float64 digits of a float32 number."""
    return [None if v is None else float(str(np.float32(v))) for v in values]


def _topk_columns(entries: list[tuple[str, float]], k: int) -> tuple[list[str], list[float]]:
    best: dict[str, float] = {}
    for tok, lp in entries:
        if tok not in best or lp > best[tok]:
            best[tok] = lp
    ordered = sorted(best.items(), key=lambda kv: -kv[1])[:k]
    return [t for t, _ in ordered], [v for _, v in ordered]


def chat_response_record(body: dict[str, Any], top_k: int, seed: int | None) -> dict[str, Any]:
    """A chat.completion body -> one divscope JSONL response (logprobs stored column-wise).

    Servers that append the sampled token to ``top_logprobs`` when it falls outside the top-k
    are normalised to the top-k proper (the sampled token's logprob is kept separately).
    """
    choices = body.get("choices") or []
    if not choices:
        return {
            "text": "",
            "finish_reason": None,
            "logprobs": None,
            "error": f"no choices: {json.dumps(body)[:200]}",
        }
    choice = choices[0]
    text = (choice.get("message") or {}).get("content") or ""
    content = (choice.get("logprobs") or {}).get("content")
    record: dict[str, Any] = {
        "text": text,
        "finish_reason": choice.get("finish_reason"),
        "id": body.get("id"),
        "seed": seed,
        "usage": body.get("usage"),
    }
    if not content:
        record["logprobs"] = None  # the provider dropped them: recorded, counted, not scored
        return record
    tokens, lps, top_t, top_l = [], [], [], []
    for d in content:
        tokens.append(d["token"])
        lps.append(d["logprob"])
        t, v = _topk_columns(
            [(e["token"], e["logprob"]) for e in d.get("top_logprobs") or []], top_k
        )
        top_t.append(t)
        top_l.append(v)
    record["logprobs"] = {
        "tokens": tokens,
        "logprobs": f32(lps),
        "top_tokens": top_t,
        "top_logprobs": [f32(x) for x in top_l],
    }
    if "".join(tokens) != text:
        record["text_matches_tokens"] = False
    return record


# ------------------------------------------------------------------------ scoring


class Scorer:
    """Scores text under one model via ``/completions`` echo logprobs."""

    def __init__(
        self, spec: ModelSpec, template: ChatTemplate, client: OpenAIClient, top_k: int
    ) -> None:
        self.spec, self.template, self.client, self.top_k = spec, template, client, top_k
        self._prompt_cache: dict[str, list[str]] = {}
        self._lock = threading.Lock()

    def messages(self, prompt: str) -> list[dict[str, str]]:
        sys_msg = (
            [{"role": "system", "content": self.spec.system_prompt}]
            if self.spec.system_prompt
            else []
        )
        return [*sys_msg, {"role": "user", "content": prompt}]

    def _echo(self, text: str) -> dict[str, Any]:
        payload: dict[str, Any] = {
            "model": self.spec.model,
            "prompt": text,
            "max_tokens": 1,
            "echo": True,
            "logprobs": self.top_k,
            "temperature": 0.0,
        }
        if self.template.eos_token_id is not None:
            payload["logit_bias"] = {str(self.template.eos_token_id): 100}
        body = self.client.post("completions", payload)
        try:
            lp = body["choices"][0]["logprobs"]
            generated = int((body.get("usage") or {}).get("completion_tokens") or 0)
            n = len(lp["tokens"]) - generated
            return {
                "tokens": lp["tokens"][:n],
                "logprobs": lp["token_logprobs"][:n],
                "top": (lp.get("top_logprobs") or [None] * n)[:n],
            }
        except (KeyError, IndexError, TypeError) as e:
            raise APIError(
                f"{self.spec.name}: /completions gave no echo logprobs ({e}); this "
                "server cannot cross-score"
            ) from e

    def score(self, prompt: str, text: str) -> dict[str, Any]:
        """Log-probabilities of ``text`` as this model's answer to ``prompt`` (column-wise)."""
        prompt_text = self.template.render(self.messages(prompt))
        with self._lock:
            head = self._prompt_cache.get(prompt_text)
        if head is None:
            head = self._echo(prompt_text)["tokens"]
            with self._lock:
                self._prompt_cache[prompt_text] = head
        full = self._echo(prompt_text + text)
        n = len(head)
        if full["tokens"][:n] != head:
            raise SeamError(
                f"{self.spec.name}: the response's first token merges with the "
                "end of the prompt; its logprob cannot be separated"
            )
        tokens = full["tokens"][n:]
        top_t, top_l = [], []
        for entry in full["top"][n:]:
            t, v = _topk_columns(list((entry or {}).items()), self.top_k)
            top_t.append(t)
            top_l.append(v)
        return {
            "tokens": tokens,
            "logprobs": f32(full["logprobs"][n:]),
            "top_tokens": top_t,
            "top_logprobs": [f32(x) for x in top_l],
        }


def first_position_js(own: dict[str, Any], cross: dict[str, Any]) -> float:
    """Top-k JS lower bound at the first position of two column-wise scorings of one text."""
    from divscope.samples import TokenVocab, _Ctx, _scores_from_columns
    from divscope.topk import coarse_bounds

    vocab = TokenVocab()
    first = [
        _scores_from_columns(
            {
                k: v[:1]
                for k, v in x.items()
                if k in ("tokens", "logprobs", "top_tokens", "top_logprobs")
            },
            _Ctx("seam check"),
            vocab,
        )
        for x in (own, cross)
    ]
    return float(coarse_bounds(*first)[1][0])


# ------------------------------------------------------------------------ the run


@dataclass
class RunSummary:
    """What a run did; also stored in the run's metadata."""

    run_dir: str
    prompts_total: int = 0
    prompts_done_before: int = 0
    prompts_done: int = 0
    prompts_failed: list[dict[str, Any]] = field(default_factory=list)
    responses: int = 0
    responses_without_logprobs: int = 0
    cross_scores: int = 0
    cross_scores_missing: int = 0
    cross_score_unavailable: dict[str, str] = field(default_factory=dict)
    seam_checks: dict[str, Any] = field(default_factory=dict)
    requests: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def complete(self) -> bool:
        return self.prompts_done_before + self.prompts_done == self.prompts_total

    def lines(self) -> list[str]:
        r = self.requests
        out = [
            f"run: {self.run_dir}",
            f"prompts: {self.prompts_done} done now, {self.prompts_done_before} done before, "
            f"{len(self.prompts_failed)} failed, {self.prompts_total} in all",
            f"responses: {self.responses} ({self.responses_without_logprobs} without logprobs)",
            f"cross-scores: {self.cross_scores} ({self.cross_scores_missing} missing)",
            f"requests: {r.get('requests', 0)}, retries: {r.get('retries', 0)}, failures: "
            f"{r.get('failures', 0)}, tokens: {r.get('prompt_tokens', 0)} prompt + "
            f"{r.get('completion_tokens', 0)} completion",
            f"time: {self.seconds:.1f} s",
        ]
        out += [
            f"cannot cross-score under {m}: {why}"
            for m, why in self.cross_score_unavailable.items()
        ]
        out += [f"failed prompt {f['index']}: {f['error']}" for f in self.prompts_failed]
        return out


def _read_done(path: Path) -> tuple[dict[int, str], bool]:
    """Complete records of a model file by prompt index, and whether the file needs cleaning."""
    done: dict[int, str] = {}
    dirty = False
    if not path.exists():
        return done, False
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
            done[int(rec["index"])] = line
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            dirty = True  # a line cut short when a run was killed: dropped, redone
    return done, dirty


def find_run_dir(config: SampleConfig) -> Path | None:
    """The newest earlier run directory of this exact config, if any."""
    base = Path(config.output.base_dir)
    if not base.exists():
        return None
    fp = config.fingerprint()
    runs = []
    for d in base.glob(f"{config.output.experiment_name}_*"):
        try:
            meta = json.loads((d / "metadata.json").read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if meta.get("fingerprint") == fp:
            runs.append(d)
    return max(runs, key=lambda d: d.name) if runs else None


class Sampler:
    """Runs a :class:`SampleConfig`; see the module docstring."""

    def __init__(
        self,
        config: SampleConfig,
        *,
        progress: bool = True,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.config = config
        self.progress = progress
        self.stats = RequestStats()
        self.clients = {
            m.name: OpenAIClient(
                m.base_url, m.api_key_env, config.requests, self.stats, sleep=sleep
            )
            for m in config.models
        }
        missing = [
            m.api_key_env
            for m in config.models
            if m.api_key_env and not os.environ.get(m.api_key_env)
        ]
        if missing:
            raise ConfigError(
                config.path,
                "models.api_key_env",
                f"environment variable {missing[0]} is not set",
                f"export {missing[0]}=... (the key is never written anywhere)",
            )
        self.templates: dict[str, ChatTemplate] = {}
        for i, m in enumerate(config.models):
            if m.chat_template:
                try:
                    self.templates[m.name] = load_template(m.chat_template, m.eos_token_id)
                except ValueError as e:
                    raise ConfigError(
                        config.path, f"models[{i}].chat_template", str(e), "fix the setting"
                    ) from e

    # -- units of work

    def _seed(self, index: int, sample: int) -> int | None:
        s = self.config.sampling.seed
        return None if s is None else (s * 1_000_003 + index * 1009 + sample) % 2**31

    def _sample(
        self, m: ModelSpec, item: PromptItem, sample: int, max_tokens: int | None = None
    ) -> dict[str, Any]:
        sp = self.config.sampling
        sys_msg = [{"role": "system", "content": m.system_prompt}] if m.system_prompt else []
        seed = self._seed(item.index, sample)
        payload: dict[str, Any] = {
            "model": m.model,
            "messages": [*sys_msg, {"role": "user", "content": item.prompt}],
            "max_tokens": max_tokens or sp.max_tokens,
            "temperature": sp.temperature,
            "top_p": sp.top_p,
            "logprobs": True,
            "top_logprobs": sp.top_logprobs,
        }
        if seed is not None:
            payload["seed"] = seed
        body = self.clients[m.name].post("chat/completions", payload)
        return chat_response_record(body, sp.top_logprobs, seed)

    def _unit(self, item: PromptItem, scorers: dict[str, Scorer]) -> dict[str, dict[str, Any]]:
        n = self.config.sampling.num_samples_per_prompt
        responses = {
            m.name: [self._sample(m, item, s) for s in range(n)] for m in self.config.models
        }
        for m in self.config.models:
            for other, scorer in scorers.items():
                if other == m.name:
                    continue
                for resp in responses[m.name]:
                    if resp.get("logprobs") is None:
                        continue
                    try:
                        cross = scorer.score(item.prompt, resp["text"])
                    except SeamError as e:
                        resp.setdefault("cross_score_errors", {})[other] = str(e)
                        continue
                    cross["aligned"] = cross["tokens"] == resp["logprobs"]["tokens"]
                    resp.setdefault("cross_scores", {})[other] = cross
        return {
            m.name: {
                "format": FORMAT,
                "index": item.index,
                "id": item.id,
                "prompt": item.prompt,
                "category": item.category,
                "model": m.name,
                "responses": responses[m.name],
            }
            for m in self.config.models
        }

    def _seam_check(self, m: ModelSpec, scorer: Scorer, item: PromptItem) -> dict[str, Any]:
        """Re-score one of m's own samples under m: the logprobs must come back unchanged."""
        resp = self._sample(m, item, 10_000, max_tokens=16)
        if resp.get("logprobs") is None:
            return {"ok": False, "reason": "the server returned no logprobs"}
        try:
            cross = scorer.score(item.prompt, resp["text"])
        except (SeamError, APIError) as e:
            return {"ok": False, "reason": str(e)}
        own = resp["logprobs"]
        if cross["tokens"] != own["tokens"]:
            return {
                "ok": False,
                "reason": "re-scoring tokenised the model's own response "
                f"differently ({own['tokens'][:5]} vs {cross['tokens'][:5]})",
            }
        diffs = [
            a - b
            for a, b in zip(own["logprobs"], cross["logprobs"], strict=True)
            if a is not None and b is not None
        ]
        if not diffs:
            return {"ok": False, "reason": "no logprobs to compare"}
        # The first response token's distribution depends only on the rendered prompt, so it
        # must agree; later tokens drift because servers evaluate a prompt in one batch and a
        # generation token by token, and with prefix caching even the first token can move
        # by a few thousandths of a nat (quantised kernels round differently). So the test is
        # on the whole first-position distribution (JS lower bound from the top-k), which a
        # wrong template shifts far more than rounding does.
        js0 = first_position_js(own, cross)
        ok = abs(diffs[0]) <= SEAM_TOLERANCE and js0 <= SEAM_JS_TOLERANCE
        check = {
            "ok": ok,
            "tokens": len(diffs),
            "first_token_diff": diffs[0],
            "first_position_js_lb": js0,
            "drift_mean": sum(diffs) / len(diffs),
            "drift_mean_abs": sum(map(abs, diffs)) / len(diffs),
            "drift_max_abs": max(map(abs, diffs)),
        }
        if not ok:
            check["reason"] = (
                f"re-scoring the model's own response moved the first token's "
                f"logprob by {diffs[0]:.3g} nats (JS >= {js0:.2g}): the chat "
                "template does not render the prompt the way the server does; "
                "set chat_template"
            )
        return check

    # -- the run

    def _resolve_run_dir(self, run_dir: Path | None, new: bool) -> Path:
        if run_dir is not None:
            return Path(run_dir)
        found = None if new else find_run_dir(self.config)
        if found is not None:
            return found
        base = Path(self.config.output.base_dir)
        name = new_run_name(self.config.output.experiment_name)
        d = base / name
        n = 1
        while d.exists():
            d = base / f"{name}_{n}"
            n += 1
        return d

    def run(self, run_dir: Path | None = None, *, new: bool = False) -> RunSummary:
        """Sample (and cross-score) every prompt not yet done; return the summary."""
        from tqdm.auto import tqdm

        t0 = time.perf_counter()
        cfg = self.config
        items = select_prompts(
            load_prompts(cfg.dataset, cfg.path), cfg.dataset.num_prompts, cfg.dataset.seed
        )
        run_dir = self._resolve_run_dir(run_dir, new)
        run_dir.mkdir(parents=True, exist_ok=True)
        meta_path = run_dir / "metadata.json"
        old_meta = json.loads(meta_path.read_text()) if meta_path.exists() else None
        if old_meta is not None and old_meta.get("fingerprint") != cfg.fingerprint():
            raise ConfigError(
                cfg.path,
                "output",
                f"{run_dir} holds a run of another config",
                "use a new experiment_name, or run with --new",
            )
        summary = RunSummary(str(run_dir), prompts_total=len(items))
        paths = {m.name: run_dir / f"{m.file_stem}.jsonl" for m in cfg.models}

        # Resume: keep prompts complete in every model's file; drop partial ones.
        per_model = {name: _read_done(p) for name, p in paths.items()}
        done = set.intersection(*(set(d) for d, _ in per_model.values()))
        for name, (recs, dirty) in per_model.items():
            if dirty or set(recs) != done:
                keep = [recs[i] for i in sorted(done)]
                atomic_write_text(paths[name], "".join(x + "\n" for x in keep), overwrite=True)
        summary.prompts_done_before = len(done & {it.index for it in items})
        todo = [it for it in items if it.index not in done]

        scorers: dict[str, Scorer] = {}
        if cfg.cross_score:
            for m in cfg.models:
                if m.name not in self.templates:
                    summary.cross_score_unavailable[m.name] = (
                        "no chat_template configured (hosted chat APIs cannot echo-score); "
                        "sampling only"
                    )
                    continue
                scorers[m.name] = Scorer(
                    m, self.templates[m.name], self.clients[m.name], cfg.sampling.top_logprobs
                )
            for m in cfg.models if todo else []:
                if m.name in scorers:
                    check = {"ok": False, "reason": "no prompt could be sampled for the check"}
                    for item in todo[:3]:  # a prompt that fails now is retried in the run
                        try:
                            check = self._seam_check(m, scorers[m.name], item)
                            break
                        except APIError as e:
                            check["reason"] = f"the check's requests failed: {e}"
                    summary.seam_checks[m.name] = check
                    if not check["ok"]:
                        summary.cross_score_unavailable[m.name] = check["reason"]
                        del scorers[m.name]

        started = (
            old_meta["started"] if old_meta else datetime.now(UTC).isoformat(timespec="seconds")
        )
        meta = run_metadata(
            "sample",
            cfg.to_json(),
            fingerprint=cfg.fingerprint(),
            started=started,
            models=[m.name for m in cfg.models],
            files={m.name: paths[m.name].name for m in cfg.models},
        )
        atomic_write_json(meta_path, {**meta, "summary": None}, overwrite=True)

        files = {name: p.open("a", encoding="utf-8") for name, p in paths.items()}
        try:
            with (
                ThreadPoolExecutor(cfg.requests.concurrency) as ex,
                tqdm(
                    total=len(items),
                    initial=len(items) - len(todo),
                    unit="prompt",
                    disable=not self.progress,
                    desc="sampling",
                ) as bar,
            ):
                futures = {ex.submit(self._unit, it, scorers): it for it in todo}
                for fut in as_completed(futures):
                    it = futures[fut]
                    try:
                        recs = fut.result()
                    except (APIError, OSError, ValueError) as e:
                        summary.prompts_failed.append({"index": it.index, "error": str(e)})
                        bar.update(1)
                        continue
                    for name, rec in recs.items():
                        files[name].write(json.dumps(rec, ensure_ascii=False) + "\n")
                        files[name].flush()
                        os.fsync(files[name].fileno())
                        self._count(summary, rec)
                    summary.prompts_done += 1
                    bar.update(1)
        finally:
            for f in files.values():
                f.close()
        summary.requests = self.stats.to_json()
        summary.seconds = time.perf_counter() - t0
        summary.prompts_failed.sort(key=lambda f: f["index"])
        meta["summary"] = asdict(summary)
        meta["complete"] = summary.complete
        atomic_write_json(meta_path, meta, overwrite=True)
        if cfg.output.legacy_pickle and summary.complete:
            for m in cfg.models:
                write_legacy_pickle(paths[m.name], run_dir / f"{m.file_stem}.pkl")
        return summary

    @staticmethod
    def _count(summary: RunSummary, rec: dict[str, Any]) -> None:
        for r in rec["responses"]:
            summary.responses += 1
            summary.responses_without_logprobs += r.get("logprobs") is None
            summary.cross_scores += len(r.get("cross_scores") or {})
            summary.cross_scores_missing += len(r.get("cross_score_errors") or {})


def write_legacy_pickle(jsonl: Path, out: Path) -> Path:
    """Write a run's JSONL as the legacy pickle (plain builtins only) for older tools."""
    records = []
    lines = jsonl.read_text(encoding="utf-8").splitlines()
    for rec in sorted((json.loads(x) for x in lines), key=lambda r: r["index"]):
        responses = []
        for r in rec["responses"]:
            lp = r.get("logprobs")
            content = (
                None
                if lp is None
                else [
                    {
                        "token": t,
                        "logprob": v,
                        "top_logprobs": [
                            {"token": a, "logprob": b} for a, b in zip(tt, tl, strict=True)
                        ],
                    }
                    for t, v, tt, tl in zip(
                        lp["tokens"],
                        lp["logprobs"],
                        lp["top_tokens"],
                        lp["top_logprobs"],
                        strict=True,
                    )
                ]
            )
            responses.append(
                {
                    "model": rec["model"],
                    "choices": [
                        {
                            "message": {"role": "assistant", "content": r["text"]},
                            "finish_reason": r.get("finish_reason"),
                            "logprobs": None if content is None else {"content": content},
                        }
                    ],
                }
            )
        records.append({"prompt": rec["prompt"], "model": rec["model"], "responses": responses})
    out.write_bytes(pickle.dumps(records, protocol=4))
    return out
