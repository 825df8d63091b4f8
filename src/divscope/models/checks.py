"""Checks on a local-model run's inputs, made before any model loads or any work starts.

Each returns what is wrong as one sentence with its fix, or None; the pipelines raise it as
their own input error (a model diff's :class:`~divscope.diff.conditions.DiffInputError`, the
persona pipeline's :class:`~divscope.personas.data.PersonaDataError`), which the CLI prints as
one line with exit status 2.
"""

from __future__ import annotations

import importlib.util
import json
import math
import numbers
import struct
from pathlib import Path
from typing import Any

SEED_MAX = 2**64 - 1  # torch.manual_seed's and vLLM's range


def sampling_problem(
    temperature: Any, top_p: Any, seed: Any, n_seeds: int = 1, max_new_tokens: Any = 1
) -> str | None:
    """What is wrong with sampling parameters: ``temperature`` must be finite and >= 0 (0 means
    greedy), ``top_p`` in (0, 1], ``max_new_tokens`` a positive integer, and ``seed`` an
    integer such that the ``n_seeds`` seeds a run derives from it (``seed + offset``, one per
    batch or response) stay within 0..2**64-1."""
    if not _real(temperature) or not math.isfinite(temperature) or temperature < 0:
        return (
            f"temperature {temperature!r} must be a finite number >= 0. Fix: 1.0 samples the "
            "model's own distribution, 0 is greedy"
        )
    if not _real(top_p) or not 0 < top_p <= 1:
        return f"top_p {top_p!r} must be in (0, 1]. Fix: 1.0 (no nucleus truncation)"
    if not is_integer(max_new_tokens) or max_new_tokens < 1:
        return f"max_new_tokens {max_new_tokens!r} must be a positive integer"
    top = SEED_MAX - max(n_seeds - 1, 0)
    if not is_integer(seed) or not 0 <= seed <= top:
        return (
            f"seed {seed!r} must be an integer from 0 to {top} (the run seeds its {n_seeds} "
            f"batches or responses with seed + offset, within 0..2**64-1). Fix: a smaller seed"
        )
    return None


def _real(x: Any) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def is_integer(x: Any) -> bool:
    """Whether ``x`` is an integer (Python's or numpy's), not a bool."""
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def context_limit(model: Any) -> int | None:
    """The model's context length (``max_position_embeddings`` of its text config), or None
    when its config does not say."""
    config = getattr(model, "config", None)
    if config is None:
        return None
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    limit = getattr(text, "max_position_embeddings", None)
    return limit if isinstance(limit, int) and limit > 0 else None


def context_problem(
    named_ids: list[tuple[str, list[int]]], max_new_tokens: int, limit: int | None,
    who: str = "the model",
) -> str | None:  # fmt: skip
    """The first prompt (``(name, rendered ids)``) whose ids plus ``max_new_tokens`` exceed
    ``limit`` tokens: generating or teacher-forcing past a model's context gives numbers that
    mean nothing (and a huge prompt runs for minutes first)."""
    if limit is None:
        return None
    for name, ids in named_ids:
        if len(ids) + max_new_tokens > limit:
            return (
                f"{name} is {len(ids)} tokens with its chat template; with max_new_tokens "
                f"{max_new_tokens} that exceeds {who}'s context of {limit} tokens "
                "(max_position_embeddings). Fix: shorten or drop the prompt, or lower "
                "max_new_tokens"
            )
    return None


def prompt_name(index: int | str, text: str) -> str:
    """``prompt 3 ('How do I pick a lock to get into my ne...')``: a prompt named in errors."""
    head = " ".join(text[:40].split())
    return f"prompt {index} ({head + ('...' if len(text) > 40 else '')!r})"


MAX_HEADER = 100_000_000  # safetensors refuses a JSON header longer than this


def safetensors_header(path: Path) -> tuple[bytes, bytes]:
    """A ``.safetensors`` file's 8-byte header length and its JSON header, unparsed (empty
    when the length is over :data:`MAX_HEADER`, which is then not read; fewer than 8 bytes
    for a file that short)."""
    with path.open("rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else 0
        return head, f.read(n) if n <= MAX_HEADER else b""


def safetensors_problem(path: Path) -> str | None:
    """Why a ``.safetensors`` file cannot be loaded, found from its header alone: too short, a
    header that is not JSON or larger than the format allows, or tensors that end past the end
    of the file (a truncated copy or download)."""
    size = path.stat().st_size
    fix = "Fix: copy or download the file again (or save the model again)"
    head, body = safetensors_header(path)
    if len(head) < 8:
        return f"{path} is not a safetensors file ({size} bytes). {fix}"
    (n,) = struct.unpack("<Q", head)
    if n > size - 8:
        return f"{path} is truncated: its header needs {n} bytes, the file has {size}. {fix}"
    if n > MAX_HEADER:
        return f"{path}: its header declares {n} bytes, over the format's {MAX_HEADER}. {fix}"
    try:
        header = json.loads(body)
    except (ValueError, RecursionError):
        return f"{path}: its header is not JSON (damaged file). {fix}"
    if not isinstance(header, dict):
        return f"{path}: its header is not a JSON object (damaged file). {fix}"
    ends = [
        t["data_offsets"][1]
        for k, t in header.items()
        if k != "__metadata__" and isinstance(t, dict) and len(t.get("data_offsets") or ()) == 2
    ]
    need = 8 + n + max((e for e in ends if isinstance(e, int)), default=0)
    if need > size:
        return f"{path} is truncated: its tensors need {need} bytes, the file has {size}. {fix}"
    return None


def weights_problem(directory: str | Path) -> str | None:
    """The first ``.safetensors`` file of a local model or adapter directory that
    :func:`safetensors_problem` refuses (None for a directory that is not local)."""
    d = Path(directory)
    if not d.is_dir():
        return None
    for f in sorted(d.glob("*.safetensors")):
        problem = safetensors_problem(f)
        if problem:
            return problem
    return None


def vllm_problem() -> str | None:
    """Why ``backend="vllm"`` cannot run here: a malformed ``$DIVSCOPE_VLLM_ARGS``, or no vLLM."""
    from divscope.models.generate import env_engine_args

    try:
        env_engine_args()
    except ValueError as e:
        return f"{e}. Fix: set it to a JSON object of vllm.LLM arguments, or unset it"
    if importlib.util.find_spec("vllm") is None:
        return (
            "backend 'vllm' needs vLLM, which is not installed. Fix: pip install "
            "'divscope[vllm]' on a CUDA machine, or use backend 'hf' (transformers)"
        )
    return None


def generation_problem(gen: dict[str, Any], n_seeds: int, backend: str) -> str | None:
    """What is wrong with a run's generation, before any model loads: :func:`sampling_problem`
    of ``gen``'s ``temperature``, ``top_p``, ``seed`` (``n_seeds`` seeds derived from it) and
    ``max_new_tokens``, then :func:`vllm_problem` where ``backend`` is ``"vllm"``."""
    problem = sampling_problem(
        gen["temperature"], gen["top_p"], gen["seed"], n_seeds, gen["max_new_tokens"]
    )
    if problem is None and backend == "vllm":
        problem = vllm_problem()
    return problem
