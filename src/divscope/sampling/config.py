"""Sampling-run configuration (YAML), validated before any request is sent."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from divscope.bounded import UnreadableFile, read_yaml

OPENROUTER = "https://openrouter.ai/api/v1"


class ConfigError(ValueError):
    """A configuration problem; the message names the file, the offending key and the fix."""

    def __init__(self, path: object, key: str, problem: str, fix: str) -> None:
        self.key = key
        super().__init__(f"{path}: {key}: {problem}. Fix: {fix}")


@dataclass
class ModelSpec:
    """One model to sample from (and to score the other models' responses with)."""

    name: str  # label: output file name and cross-score key
    model: str  # the model id sent to the server
    base_url: str = OPENROUTER
    api_key_env: str | None = "OPENROUTER_API_KEY"
    chat_template: str | None = None  # .jinja file, .gguf file or built-in name; for scoring
    eos_token_id: int | None = None  # stops echo requests (read from a .gguf when given)
    system_prompt: str | None = None

    @property
    def file_stem(self) -> str:
        return "".join(c if c.isalnum() or c in "-_." else "_" for c in self.name)


@dataclass
class DatasetSpec:
    source: str = "local"
    path: str | None = None
    name: str | None = None  # huggingface dataset name
    split: str = "train"
    prompt_field: str = "prompt"
    num_prompts: int | None = None
    seed: int = 42


@dataclass
class SamplingSpec:
    num_samples_per_prompt: int = 5
    max_tokens: int = 200
    temperature: float = 1.0
    top_p: float = 1.0
    logprobs: bool = True
    top_logprobs: int = 20
    seed: int | None = 0  # per-request seeds derive from it (reproducible, resumable runs)


@dataclass
class RequestSpec:
    concurrency: int = 4
    max_attempts: int = 6
    backoff_base_s: float = 1.0
    backoff_max_s: float = 60.0
    timeout_s: float = 120.0  # the whole request: connect, headers and body


@dataclass
class OutputSpec:
    base_dir: str = "experiments/results"
    experiment_name: str = "samples"
    legacy_pickle: bool = False


@dataclass
class SampleConfig:
    """A whole sampling run."""

    models: list[ModelSpec]
    dataset: DatasetSpec
    sampling: SamplingSpec = field(default_factory=SamplingSpec)
    requests: RequestSpec = field(default_factory=RequestSpec)
    output: OutputSpec = field(default_factory=OutputSpec)
    cross_score: bool = True
    path: str = "<config>"

    def to_json(self) -> dict[str, Any]:
        """The configuration as data (API keys are never part of it: only env-var names)."""
        d = asdict(self)
        d.pop("path")
        return d

    def fingerprint(self) -> str:
        """Hash of what determines the samples (not concurrency or retry settings)."""
        d = self.to_json()
        d.pop("requests")
        d["output"].pop("legacy_pickle")
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


_TYPES = {
    "int": (int,),
    "float": (int, float),
    "bool": (bool,),
    "str": (str,),
    "None": (type(None),),
}


def _has_type(value: Any, annotation: str) -> bool:
    """``value``'s exact type is admitted by an annotation like ``"int | None"``."""
    return type(value) in tuple(t for part in annotation.split("|") for t in _TYPES[part.strip()])


def _section(raw: dict, key: str, cls: type, path: object) -> Any:
    value = raw.get(key) or {}
    if not isinstance(value, dict):
        raise ConfigError(
            path, key, f"expected a mapping, got {type(value).__name__}", f"write {key}: {{...}}"
        )
    fields = cls.__dataclass_fields__
    unknown = sorted(set(value) - set(fields))
    if unknown:
        raise ConfigError(
            path, f"{key}.{unknown[0]}", "unknown key", f"use one of {', '.join(fields)}"
        )
    out = cls(**value)
    for name, f in fields.items():
        v = getattr(out, name)
        if not _has_type(v, str(f.type)):
            raise ConfigError(
                path, f"{key}.{name}", f"{v!r} is not of type {f.type}", "fix the value"
            )
    return out


def _model(raw: Any, i: int, path: object) -> ModelSpec:
    if isinstance(raw, str):
        return ModelSpec(name=raw, model=raw)
    if not isinstance(raw, dict):
        raise ConfigError(
            path,
            f"models[{i}]",
            "expected a model id or a mapping",
            "write a model id or {model, base_url, api_key_env, ...}",
        )
    fields = ModelSpec.__dataclass_fields__
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ConfigError(
            path, f"models[{i}].{unknown[0]}", "unknown key", f"use one of {', '.join(fields)}"
        )
    if not isinstance(raw.get("model"), str):
        raise ConfigError(
            path,
            f"models[{i}].model",
            "missing or not a string",
            "give the model id the server expects",
        )
    spec = ModelSpec(**{"name": raw["model"], **raw})
    if "api_key_env" not in raw and spec.base_url.rstrip("/") != OPENROUTER:
        spec.api_key_env = None
    for name, f in fields.items():
        v = getattr(spec, name)
        if not _has_type(v, str(f.type)):
            raise ConfigError(
                path, f"models[{i}].{name}", f"{v!r} is not of type {f.type}", "fix the value"
            )
    for key in ("name", "base_url"):
        if not isinstance(getattr(spec, key), str) or not getattr(spec, key):
            raise ConfigError(
                path, f"models[{i}].{key}", "must be a non-empty string", "fix the value"
            )
    if not spec.base_url.startswith(("http://", "https://")):
        raise ConfigError(
            path,
            f"models[{i}].base_url",
            f"{spec.base_url!r} is not a URL",
            "give e.g. http://127.0.0.1:8080/v1",
        )
    return spec


def parse_config(raw: Any, path: object = "<config>") -> SampleConfig:
    """Validate a configuration mapping; raise :class:`ConfigError` naming the bad key."""
    if not isinstance(raw, dict):
        raise ConfigError(path, "<top>", "expected a mapping", "see experiments/configs/")
    known = {"models", "dataset", "sampling", "requests", "output", "cross_score"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(path, unknown[0], "unknown key", f"use one of {', '.join(sorted(known))}")
    models_raw = raw.get("models")
    if not isinstance(models_raw, list) or len(models_raw) < 1:
        raise ConfigError(path, "models", "expected a non-empty list", "list the models to sample")
    models = [_model(m, i, path) for i, m in enumerate(models_raw)]
    names = [m.name for m in models]
    if len(set(names)) != len(names) or len({m.file_stem for m in models}) != len(models):
        raise ConfigError(
            path, "models", f"duplicate model names {names}", "give each model a distinct name:"
        )
    dataset = _section(raw, "dataset", DatasetSpec, path)
    if dataset.source == "local" and not dataset.path:
        raise ConfigError(path, "dataset.path", "missing", "give a prompts file (.jsonl or .txt)")
    if dataset.source not in ("local", "huggingface"):
        raise ConfigError(path, "dataset.source", f"{dataset.source!r}", "use local or huggingface")
    if dataset.num_prompts is not None and dataset.num_prompts < 1:
        raise ConfigError(path, "dataset.num_prompts", "must be >= 1", "fix the value")
    sampling = _section(raw, "sampling", SamplingSpec, path)
    if sampling.num_samples_per_prompt < 1:
        raise ConfigError(path, "sampling.num_samples_per_prompt", "must be >= 1", "fix it")
    if sampling.max_tokens < 1:
        raise ConfigError(path, "sampling.max_tokens", "must be >= 1", "fix it")
    if not 0 <= sampling.top_logprobs <= 20:
        raise ConfigError(
            path, "sampling.top_logprobs", "must be in 0..20 (the API's limit)", "fix it"
        )
    if not sampling.logprobs:
        raise ConfigError(
            path, "sampling.logprobs", "must be true: divscope needs logprobs", "set logprobs: true"
        )
    _check_ranges(sampling, path)
    requests_ = _section(raw, "requests", RequestSpec, path)
    if requests_.concurrency < 1 or requests_.max_attempts < 1:
        raise ConfigError(path, "requests", "concurrency and max_attempts must be >= 1", "fix it")
    for key, value in (
        ("timeout_s", requests_.timeout_s),
        ("backoff_base_s", requests_.backoff_base_s),
        ("backoff_max_s", requests_.backoff_max_s),
    ):
        low_ok = value > 0 if key == "timeout_s" else value >= 0
        if not (low_ok and math.isfinite(value)):
            need = "> 0" if key == "timeout_s" else ">= 0"
            raise ConfigError(path, f"requests.{key}", f"{value!r} is not {need}", "fix the value")
    output = _section(raw, "output", OutputSpec, path)
    cross = raw.get("cross_score", True)
    if type(cross) is not bool:
        raise ConfigError(path, "cross_score", f"{cross!r} is not true/false", "fix it")
    return SampleConfig(models, dataset, sampling, requests_, output, cross, str(path))


def _check_ranges(sampling: SamplingSpec, path: object) -> None:
    """Refuse at load time what would make every request fail (or mean nothing)."""
    t, p = sampling.temperature, sampling.top_p
    if not (math.isfinite(t) and t >= 0):
        raise ConfigError(
            path, "sampling.temperature", f"{t!r} is not >= 0", "use 0 (greedy) or more"
        )
    if not (math.isfinite(p) and 0 < p <= 1):
        raise ConfigError(path, "sampling.top_p", f"{p!r} is not in (0, 1]", "use e.g. 1.0")


def load_config(path: str | Path) -> SampleConfig:
    """Read and validate a YAML sampling configuration."""
    path = Path(path)
    try:
        raw = read_yaml(path)
    except UnreadableFile as e:
        raise ConfigError(path, "<file>", e.problem, e.fix) from e
    config = parse_config(raw, path)
    base = Path(config.output.base_dir)
    if base.exists() and not base.is_dir():
        raise ConfigError(path, "output.base_dir", f"{base} is a file", "give a folder")
    return config
