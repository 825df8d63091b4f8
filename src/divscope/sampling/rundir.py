"""A sampling run's directory: find it again, resume it, summarise it, write legacy files.

A run directory holds one JSONL file per model (one record per finished prompt) and
``metadata.json`` with the config's fingerprint, which is how a rerun of the same config finds
the directory again and does only the prompts that are missing.
"""

from __future__ import annotations

import json
import pickle
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from divscope.runmeta import atomic_write_text, dir_lock, new_run_name
from divscope.sampling.config import ConfigError, SampleConfig


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


def read_done(path: Path) -> tuple[dict[int, str], bool]:
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


def resolve_run_dir(config: SampleConfig, run_dir: Path | None, new: bool) -> Path:
    """``run_dir`` if given, else this config's earlier run (unless ``new``), else a fresh name."""
    if run_dir is not None:
        return Path(run_dir)
    found = None if new else find_run_dir(config)
    if found is not None:
        return found
    base = Path(config.output.base_dir)
    name = new_run_name(config.output.experiment_name)
    d = base / name
    n = 1
    while d.exists():
        d = base / f"{name}_{n}"
        n += 1
    return d


def open_run_dir(config: SampleConfig, run_dir: Path) -> dict[str, Any] | None:
    """Create ``run_dir`` if needed; return its earlier metadata (None for a new run).

    Raises:
        ConfigError: The directory holds a run of another config.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    meta_path = run_dir / "metadata.json"
    old_meta = json.loads(meta_path.read_text()) if meta_path.exists() else None
    if old_meta is not None and old_meta.get("fingerprint") != config.fingerprint():
        raise ConfigError(
            config.path,
            "output",
            f"{run_dir} holds a run of another config",
            "use a new experiment_name, or run with --new",
        )
    return old_meta


def resume(paths: dict[str, Path]) -> set[int]:
    """Prompt indices complete in every model's file; files are cut back to exactly those
    (a line cut short by a kill, or a prompt done for one model only, is dropped and redone)."""
    per_model = {name: read_done(p) for name, p in paths.items()}
    done = set.intersection(*(set(d) for d, _ in per_model.values()))
    for name, (recs, dirty) in per_model.items():
        if dirty or set(recs) != done:
            keep = [recs[i] for i in sorted(done)]
            atomic_write_text(paths[name], "".join(x + "\n" for x in keep), overwrite=True)
    return done


def locked(config: SampleConfig, run_dir: Path) -> AbstractContextManager[None]:
    """Hold an exclusive lock on ``run_dir`` while a sampler works in it
    (:func:`divscope.runmeta.dir_lock`).

    Raises:
        ConfigError: Another sampler holds it (two samplers on one run would sample every
            remaining prompt twice and leave duplicates).
    """
    return dir_lock(
        run_dir,
        lambda: ConfigError(
            config.path,
            "output",
            f"another sampler is running in {run_dir}",
            "wait for it to finish (then rerun to resume), or start a separate run with --new",
        ),
    )
