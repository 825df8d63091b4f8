"""The model diff's unit of work: one prompt's responses from both conditions, teacher-forced
under both, exact at every position over the whole vocabulary.

:func:`score_prompt_pair` takes the two models and a plain :class:`PromptPair` (prompt ids per
side, response ids per side) and returns a plain :class:`PairScores` (numpy arrays): per
position KL(A||B), KL(B||A), JS (nats), whether the two argmax tokens agree, the sampled
token's log-probability under each side, both sides' top-k; and the "what changed" sums over
the vocabulary. The hidden states come from the persona scorer's machinery
(:func:`divscope.models.teacher_force.response_states`: the prompt runs once, every response
only its own tokens against it) and the output heads run chunk by chunk in fp32 into the fused
divergence, so no ``(responses, positions, vocab)`` tensor exists.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from divscope.divergence.attribution import WhatChanged
from divscope.divergence.fused import js_and_kls_from_logits
from divscope.models.generate import GenChunk, generate_chunk
from divscope.models.teacher_force import (
    fp32_logits,
    output_head,
    prompt_kv,
    response_states,
)

SIDES = ("a", "b")


@dataclass(frozen=True)
class PromptPair:
    """One prompt's work: each side's prompt ids and sampled responses (token ids)."""

    prompt_a: list[int]
    prompt_b: list[int]
    responses: dict[str, list[list[int]]]  # "a" / "b" -> the responses that side generated


@dataclass
class SideScores:
    """Per-position values over one side's responses, concatenated (``lengths`` splits them).

    Whatever side generated the responses, ``kl_ab`` is KL(P_A||P_B) and ``kl_ba``
    KL(P_B||P_A) at each position; ``lp_a`` / ``lp_b`` are the sampled token's log-probability
    under A / B; ``top_*`` the top-k token ids and log-probabilities of each side.
    """

    lengths: np.ndarray  # (R,) int64
    kl_ab: np.ndarray  # (N,) float32, nats
    kl_ba: np.ndarray
    js: np.ndarray
    agree: np.ndarray  # (N,) bool: argmax_A == argmax_B
    lp_a: np.ndarray  # (N,) float32
    lp_b: np.ndarray
    top_ids_a: np.ndarray  # (N, K) int32
    top_lp_a: np.ndarray  # (N, K) float32
    top_ids_b: np.ndarray
    top_lp_b: np.ndarray

    def split(self, name: str) -> list[np.ndarray]:
        """Array ``name`` cut into one piece per response."""
        return np.split(getattr(self, name), np.cumsum(self.lengths)[:-1])


@dataclass
class PairScores:
    """A scored prompt: each side's :class:`SideScores` and the "what changed" sums."""

    sides: dict[str, SideScores]
    changed: np.ndarray  # (3, V) float64: sums of P_B - P_A, w (log P_B - log P_A), w
    n_positions: int


def score_pair_on(
    loaded: dict[str, tuple[Any, Any]], pair: PromptPair, *, top_k: int
) -> PairScores:
    """:func:`score_prompt_pair` with a worker's two models (side -> ``(model, tokenizer)``)."""
    return score_prompt_pair(loaded["a"][0], loaded["b"][0], pair, top_k=top_k)


def generate_side(
    loaded: dict[str, tuple[Any, Any]], chunk: GenChunk, **gen: Any
) -> list[list[int]]:
    """One generation chunk with the model of the chunk's side."""
    model, tok = loaded[chunk.side or "a"]
    return generate_chunk(model, tok, chunk, **gen)


RESPONSE_BATCH = 8  # responses per forward pass: bounds the working memory whatever S is
# Positions per chunk of fp32 logits, both models (2 x 512 x V floats, 200 MB at V = 49k):
# the output projections run at 145 GFLOP/s on 2 AVX2 cores with 512 rows, 104 with 128.
HEAD_ROWS = 512


@torch.no_grad()
def score_prompt_pair(
    model_a: Any, model_b: Any, pair: PromptPair, *, top_k: int = 20
) -> PairScores:
    """Teacher-force every response of ``pair`` under both models (see the module doc)."""
    heads = {"a": output_head(model_a), "b": output_head(model_b)}
    models = {"a": model_a, "b": model_b}
    prompts = {"a": pair.prompt_a, "b": pair.prompt_b}
    kvs = {s: prompt_kv(models[s], [prompts[s]]) for s in SIDES}  # each prompt runs once
    changed = WhatChanged(heads["a"][0].shape[0])
    sides = {}
    for side in SIDES:
        responses = pair.responses[side]
        cols: dict[str, list[np.ndarray]] = {}
        for start in range(0, len(responses), RESPONSE_BATCH):
            batch = responses[start : start + RESPONSE_BATCH]
            states = {
                s: response_states(models[s], kvs[s], [prompts[s]], [0] * len(batch), batch)
                for s in SIDES
            }
            # every real position of the batch, response after response (padding dropped)
            lengths = torch.tensor([len(r) for r in batch])
            keep = torch.arange(states["a"].shape[1])[None, :] < lengths[:, None]
            h = {s: states[s][keep] for s in SIDES}  # (positions, H), contiguous
            tokens = torch.tensor([t for r in batch for t in r], device=h["a"].device)
            _positions(h["a"], h["b"], tokens, heads, top_k, changed, cols)
        sides[side] = _side_scores(responses, cols, top_k)
    return PairScores(sides, changed.sums(), changed.n_pos)


def _positions(
    h_a: torch.Tensor,
    h_b: torch.Tensor,
    tokens: torch.Tensor,
    heads: dict[str, tuple],
    top_k: int,
    changed: WhatChanged,
    cols: dict[str, list[np.ndarray]],
) -> None:
    """Positions ``(N, H)`` of both models, a cache-sized chunk at a time: the output heads
    in fp32 into reused buffers, then one fused pass for the divergences and normalisers and
    one for the "what changed" sums; top-k and the sampled token from the logits."""
    vocab, step = heads["a"][0].shape[0], HEAD_ROWS
    bufs = [torch.empty(min(step, h_a.shape[0]) * vocab, device=h_a.device) for _ in range(2)]
    for t0 in range(0, h_a.shape[0], step):
        xa = fp32_logits(h_a[t0 : t0 + step], heads["a"], bufs[0])
        xb = fp32_logits(h_b[t0 : t0 + step], heads["b"], bufs[1])
        js, kl_ab, kl_ba, lse_a, lse_b = js_and_kls_from_logits(xa, xb)
        changed.add_logits(xa, xb, lse_a, lse_b)
        tok = tokens[t0 : t0 + step, None]
        ta, ia = xa.topk(top_k, -1)
        tb, ib = xb.topk(top_k, -1)
        for name, v in (
            ("kl_ab", kl_ab),
            ("kl_ba", kl_ba),
            ("js", js),
            ("agree", ia[:, 0] == ib[:, 0]),
            ("lp_a", xa.gather(1, tok)[:, 0] - lse_a),
            ("lp_b", xb.gather(1, tok)[:, 0] - lse_b),
            ("top_ids_a", ia.int()),
            ("top_lp_a", ta - lse_a[:, None]),
            ("top_ids_b", ib.int()),
            ("top_lp_b", tb - lse_b[:, None]),
        ):
            cols.setdefault(name, []).append(v.cpu().numpy())


def _side_scores(
    responses: list[list[int]], cols: dict[str, list[np.ndarray]], top_k: int
) -> SideScores:
    lengths = np.array([len(r) for r in responses], dtype=np.int64)

    def cat(name: str, dtype: Any, shape: tuple[int, ...] = ()) -> np.ndarray:
        parts = cols.get(name)
        return np.concatenate(parts).astype(dtype) if parts else np.zeros((0, *shape), dtype)

    return SideScores(
        lengths,
        cat("kl_ab", np.float32),
        cat("kl_ba", np.float32),
        cat("js", np.float32),
        cat("agree", bool),
        cat("lp_a", np.float32),
        cat("lp_b", np.float32),
        cat("top_ids_a", np.int32, (top_k,)),
        cat("top_lp_a", np.float32, (top_k,)),
        cat("top_ids_b", np.int32, (top_k,)),
        cat("top_lp_b", np.float32, (top_k,)),
    )


@torch.no_grad()
def sequence_scores(
    model: Any, prompt: list[int], responses: list[list[int]], *, top_k: int = 20
) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """One model's log-probabilities of token sequences after ``prompt`` (teacher-forced):
    per response ``(logprobs (T,), top_ids (T, K), top_logprobs (T, K))``. Used to cross-score
    when two models' tokenizers differ (each scores the text in its own tokens)."""
    head = output_head(model)
    kv = prompt_kv(model, [prompt])
    empty = (
        np.zeros(0, np.float32),
        np.zeros((0, top_k), np.int32),
        np.zeros((0, top_k), np.float32),
    )
    out = [empty] * len(responses)
    todo = [i for i, r in enumerate(responses) if r]
    for start in range(0, len(todo), RESPONSE_BATCH):
        idx = todo[start : start + RESPONSE_BATCH]
        batch = [responses[i] for i in idx]
        states = response_states(model, kv, [prompt], [0] * len(batch), batch)
        for r, (i, resp) in enumerate(zip(idx, batch, strict=True)):
            x = fp32_logits(states[r, : len(resp)], head)
            lse = torch.logsumexp(x, -1)
            top, ids = x.topk(top_k, -1)
            lp = x.gather(1, torch.tensor(resp, device=x.device)[:, None])[:, 0] - lse
            out[i] = (lp.cpu().numpy(), ids.int().cpu().numpy(), (top - lse[:, None]).cpu().numpy())
    return out
