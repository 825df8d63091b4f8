"""Generate one response per prompt (token ids kept): transformers (CPU/GPU) or vLLM (GPU)."""

from __future__ import annotations

from typing import Any

import torch


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
) -> list[list[int]]:
    """Generation with vLLM (the `vllm` extra, CUDA); imported only when called."""
    try:
        from vllm import LLM, SamplingParams
    except ImportError as e:
        raise RuntimeError(
            "backend 'vllm' needs the vllm extra (pip install -e '.[vllm]') and a CUDA GPU"
        ) from e
    stops = stop_ids(tokenizer)
    llm = LLM(model=model_path, dtype=dtype, seed=seed)
    params = SamplingParams(
        temperature=temperature,
        top_p=top_p,
        max_tokens=max_new_tokens,
        seed=seed,
        stop_token_ids=sorted(stops),
    )
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    return [_cut(list(o.outputs[0].token_ids), stops) for o in outs]
