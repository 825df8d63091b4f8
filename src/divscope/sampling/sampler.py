"""Sample responses with logprobs from OpenAI-compatible servers, and cross-score them.

``divscope sample --config CONFIG`` runs :class:`Sampler`. Work is one unit per prompt: every
model's samples for the prompt, then (``cross_score: true``) every model's log-probabilities
of every other model's responses (:mod:`divscope.sampling.cross_score`). A finished unit is
appended to each model's JSONL file and flushed; a rerun of the same config finds the run
directory again (by the config's fingerprint, :mod:`divscope.sampling.rundir`) and does only
the prompts that are missing. A prompt whose requests fail for good is reported and left for
the next run; nothing else is lost. Retries and backoff live in
:mod:`divscope.sampling.client`.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from divscope.runmeta import atomic_write_json, run_metadata
from divscope.samples.records import FORMAT
from divscope.sampling.client import APIError, OpenAIClient, RequestStats
from divscope.sampling.config import ConfigError, ModelSpec, SampleConfig
from divscope.sampling.cross_score import Scorer, SeamError, seam_check
from divscope.sampling.prompts import PromptItem, load_prompts, select_prompts
from divscope.sampling.responses import chat_response_record
from divscope.sampling.rundir import (
    RunSummary,
    locked,
    open_run_dir,
    resolve_run_dir,
    resume,
    write_legacy_pickle,
)
from divscope.sampling.templates import ChatTemplate, load_template


class Sampler:
    """Runs a :class:`SampleConfig`: :meth:`run` is the orchestrator, :meth:`unit` the work."""

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
        check_api_keys(config)
        self.templates = load_templates(config)

    # -- units of work

    def _seed(self, index: int, sample: int) -> int | None:
        s = self.config.sampling.seed
        return None if s is None else (s * 1_000_003 + index * 1009 + sample) % 2**31

    def sample(
        self,
        m: ModelSpec,
        item: PromptItem,
        sample: int,
        max_tokens: int | None = None,
        temperature: float | None = None,
    ) -> dict[str, Any]:
        """One response of model ``m`` to ``item`` (a divscope JSONL response record)."""
        sp = self.config.sampling
        sys_msg = [{"role": "system", "content": m.system_prompt}] if m.system_prompt else []
        seed = self._seed(item.index, sample)
        payload: dict[str, Any] = {
            "model": m.model,
            "messages": [*sys_msg, {"role": "user", "content": item.prompt}],
            "max_tokens": max_tokens or sp.max_tokens,
            "temperature": sp.temperature if temperature is None else temperature,
            "top_p": sp.top_p,
            "logprobs": True,
            "top_logprobs": sp.top_logprobs,
        }
        if seed is not None:
            payload["seed"] = seed
        body = self.clients[m.name].post("chat/completions", payload)
        try:
            record = chat_response_record(body, sp.top_logprobs, seed)
            json.dumps(record, ensure_ascii=False).encode("utf-8")  # writable as it stands
        except (AttributeError, KeyError, TypeError, ValueError, IndexError) as e:
            # a malformed 200 body is this prompt's failure (reported, redone on resume)
            raise APIError(f"{m.name}: malformed response ({type(e).__name__}: {e})") from None
        return record

    def unit(self, item: PromptItem, scorers: dict[str, Scorer]) -> dict[str, dict[str, Any]]:
        """One prompt: every model's samples, cross-scored by every other model's scorer.

        Returns:
            Model name -> its JSONL record for the prompt.
        """
        n = self.config.sampling.num_samples_per_prompt
        models = self.config.models
        responses = {m.name: [self.sample(m, item, s) for s in range(n)] for m in models}
        for m in models:
            for other, scorer in scorers.items():
                if other != m.name:
                    cross_score_all(scorer, other, item.prompt, responses[m.name])
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
            for m in models
        }

    # -- the run

    def run(self, run_dir: Path | None = None, *, new: bool = False) -> RunSummary:
        """Sample (and cross-score) every prompt not yet done; return the summary."""
        t0 = time.perf_counter()
        cfg = self.config
        items = select_prompts(
            load_prompts(cfg.dataset, cfg.path), cfg.dataset.num_prompts, cfg.dataset.seed
        )
        run_dir = resolve_run_dir(cfg, run_dir, new)
        with locked(cfg, run_dir):
            return self.run_locked(run_dir, items, t0)

    def run_locked(self, run_dir: Path, items: list[PromptItem], t0: float) -> RunSummary:
        """:meth:`run` once ``run_dir`` is locked: resume, check the seams, sample, finish."""
        cfg = self.config
        old_meta = open_run_dir(cfg, run_dir)
        summary = RunSummary(str(run_dir), prompts_total=len(items))
        paths = {m.name: run_dir / f"{m.file_stem}.jsonl" for m in cfg.models}
        done = resume(paths)
        summary.prompts_done_before = len(done & {it.index for it in items})
        todo = [it for it in items if it.index not in done]
        scorers = self.checked_scorers(todo, summary)
        meta = self.start_metadata(run_dir, paths, old_meta)
        self.sample_all(todo, scorers, paths, summary, total=len(items))
        summary.requests = self.stats.to_json()
        summary.seconds = time.perf_counter() - t0
        summary.prompts_failed.sort(key=lambda f: f["index"])
        meta["summary"] = asdict(summary)
        meta["complete"] = summary.complete
        atomic_write_json(run_dir / "metadata.json", meta, overwrite=True)
        if cfg.output.legacy_pickle and summary.complete:
            for m in cfg.models:
                write_legacy_pickle(paths[m.name], run_dir / f"{m.file_stem}.pkl")
        return summary

    def checked_scorers(self, todo: list[PromptItem], summary: RunSummary) -> dict[str, Scorer]:
        """A scorer per model that can cross-score and passes the seam check on its server."""
        cfg = self.config
        if not cfg.cross_score:
            return {}
        scorers: dict[str, Scorer] = {}
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
                # a prompt that fails now is retried in the run; a response that re-tokenises
                # differently says nothing about the template: the next prompt is tried
                for item in todo[:3]:
                    try:
                        own = self.sample(m, item, 10_000, max_tokens=16, temperature=0.0)
                        check = seam_check(scorers[m.name], item.prompt, own)
                    except APIError as e:
                        check["reason"] = f"the check's requests failed: {e}"
                        continue
                    if not check.get("retokenised"):
                        break
                summary.seam_checks[m.name] = check
                if not check["ok"]:
                    summary.cross_score_unavailable[m.name] = check["reason"]
                    del scorers[m.name]
        return scorers

    def start_metadata(
        self, run_dir: Path, paths: dict[str, Path], old_meta: dict[str, Any] | None
    ) -> dict[str, Any]:
        """Write the run's metadata (summary still None) before any sampling; return it."""
        cfg = self.config
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
        atomic_write_json(run_dir / "metadata.json", {**meta, "summary": None}, overwrite=True)
        return meta

    def sample_all(
        self,
        todo: list[PromptItem],
        scorers: dict[str, Scorer],
        paths: dict[str, Path],
        summary: RunSummary,
        total: int,
    ) -> None:
        """Run the units concurrently; append each finished one to every model's file."""
        from tqdm.auto import tqdm

        files = {name: p.open("a", encoding="utf-8") for name, p in paths.items()}
        try:
            with (
                ThreadPoolExecutor(self.config.requests.concurrency) as ex,
                tqdm(
                    total=total,
                    initial=total - len(todo),
                    unit="prompt",
                    disable=not self.progress,
                    desc="sampling",
                ) as bar,
            ):
                futures = {ex.submit(self.unit, it, scorers): it for it in todo}
                for fut in as_completed(futures):
                    it = futures[fut]
                    try:
                        recs = fut.result()
                    except (APIError, OSError, ValueError) as e:
                        summary.prompts_failed.append({"index": it.index, "error": str(e)})
                    else:
                        append_unit(files, recs, summary)
                    bar.update(1)
        finally:
            for f in files.values():
                f.close()


def check_api_keys(config: SampleConfig) -> None:
    """Raise :class:`ConfigError` (naming the variable, never the value) if a key is unset."""
    missing = [
        m.api_key_env
        for m in config.models
        if m.api_key_env and not (os.environ.get(m.api_key_env) or "").strip()
    ]
    if missing:
        raise ConfigError(
            config.path,
            "models.api_key_env",
            f"environment variable {missing[0]} is not set",
            f"export {missing[0]}=... (the key is never written anywhere)",
        )


def load_templates(config: SampleConfig) -> dict[str, ChatTemplate]:
    """The chat template of every model that names one (needed to cross-score)."""
    templates: dict[str, ChatTemplate] = {}
    for i, m in enumerate(config.models):
        if m.chat_template:
            try:
                templates[m.name] = load_template(m.chat_template, m.eos_token_id)
            except ValueError as e:
                raise ConfigError(
                    config.path, f"models[{i}].chat_template", str(e), "fix the setting"
                ) from e
    return templates


def cross_score_all(
    scorer: Scorer, other: str, prompt: str, responses: list[dict[str, Any]]
) -> None:
    """Add ``other``'s cross-score (or the reason it failed) to each response, in place."""
    for resp in responses:
        if resp.get("logprobs") is None:
            continue
        try:
            cross = scorer.score(prompt, resp["text"])
        except SeamError as e:
            resp.setdefault("cross_score_errors", {})[other] = str(e)
            continue
        cross["aligned"] = cross["tokens"] == resp["logprobs"]["tokens"]
        resp.setdefault("cross_scores", {})[other] = cross


def append_unit(files: dict[str, IO[str]], recs: dict[str, Any], summary: RunSummary) -> None:
    """Append a finished prompt's records to each model's file (flushed, fsynced); count them."""
    for name, rec in recs.items():
        files[name].write(json.dumps(rec, ensure_ascii=False) + "\n")
        files[name].flush()
        os.fsync(files[name].fileno())
        for r in rec["responses"]:
            summary.responses += 1
            summary.responses_without_logprobs += r.get("logprobs") is None
            summary.cross_scores += len(r.get("cross_scores") or {})
            summary.cross_scores_missing += len(r.get("cross_score_errors") or {})
    summary.prompts_done += 1
