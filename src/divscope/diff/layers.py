"""Where inside the model a diff arises: the per-block units of ``divscope diff --layers``.

On A's samples, teacher-forced exactly as the diff does, for two models that share an
architecture (DESIGN.md, pipeline 3):

* **Walk B -> A.** Hybrid M_k = A's parts up to part k (embeddings, block 0, ..., block L-1),
  B's above (B's blocks, final norm and head). ``forward[k]`` = the sum over positions of
  KL(P_A || P_{M_k}). All of B gives KL(A||B), all of A gives 0, so the drops between
  consecutive hybrids (each part's contribution) sum exactly to KL(A||B).
* **Walk A -> B.** M'_k = B's parts up to part k, A's above: ``reverse[k]``; the rises sum to
  KL(A||B) too. A block's contribution is measured with A below and B above in one walk and
  the other way round in the other: the two bracket interactions between blocks.
* **Drift** of the residual stream after every block on the same positions (sums of
  ``|h_B - h_A|^2``, ``|h_A|^2``, cosines and of ``h_B - h_A``), with a numerical floor: A
  against itself, each sample run alone instead of in the batch.
* **Directions** (:func:`score_directions`): the KL(P_A || P_M) of A with B's component along
  a given direction put in at block l's output, for the causal check of a block's mean change.

Every hybrid reuses the residual stream below its switch point (:func:`divscope.models.hybrid.
triangle`); heads run in fp32 chunk by chunk into the fused divergence; all sums are float64.
:func:`score_layers` is one prompt's unit (like :func:`divscope.diff.score.score_prompt_pair`),
run on an executor and cached by the orchestration in :mod:`divscope.diff.layers_run`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from divscope.divergence.fused import kl_sums_from_logits
from divscope.models.hybrid import Stack, blocks, final_norm, record_stack, run_blocks, triangle
from divscope.models.teacher_force import fp32_logits, output_head, pad_right

RESPONSE_BATCH = 8  # samples per batch: bounds the hybrids' memory whatever the sample count
HEAD_ROWS = 512  # positions per chunk of fp32 logits (as in divscope.diff.score)


@dataclass
class LayerScores:
    """One prompt's sums over the scored positions of A's samples (float64).

    ``forward`` / ``reverse`` ``(L + 1,)``: KL(P_A || P_M) for the hybrids after part k =
    embeddings, block 0, ..., block L-1 switched (see the module doc); ``kl_total`` KL(A||B);
    ``drift`` ``(5, L)``: ``|h_B - h_A|^2``, ``|h_A|^2``, ``cos(h_A, h_B)``, and the floor's
    ``|dh|^2`` and cosine; ``delta`` ``(2, L, H)``: ``h_B - h_A`` and the floor's ``dh``.
    """

    kl_total: float
    forward: np.ndarray
    reverse: np.ndarray
    drift: np.ndarray
    delta: np.ndarray
    n_positions: int

    def __add__(self, other: LayerScores) -> LayerScores:
        return LayerScores(
            self.kl_total + other.kl_total,
            self.forward + other.forward,
            self.reverse + other.reverse,
            self.drift + other.drift,
            self.delta + other.delta,
            self.n_positions + other.n_positions,
        )


@dataclass(frozen=True)
class LayerUnit:
    """One prompt's layer work: the prompt ids and A's samples (token ids)."""

    prompt: list[int]
    responses: list[list[int]]


@dataclass
class Ends:
    """A model's final norm and fp32 output head."""

    norm: torch.nn.Module
    head: tuple[torch.Tensor, torch.Tensor | None, float | None]

    @classmethod
    def of(cls, model: torch.nn.Module) -> Ends:
        return cls(final_norm(model), output_head(model))

    def logits(self, h: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """fp32 logits of last residual states ``(N, H)``."""
        return fp32_logits(self.norm(h), self.head, out)


def scored_rows(prompt_len: int, batch: list[list[int]], width: int) -> torch.Tensor:
    """Flat indices into ``(B * width)`` of the positions that predict each response token."""
    return torch.tensor(
        [i * width + prompt_len - 1 + t for i, r in enumerate(batch) for t in range(len(r))]
    )


def _at(h: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Rows of ``(..., B, S, H)`` at flat positions: ``(..., N, H)``."""
    lead = h.shape[:-3]
    return h.reshape(*lead, -1, h.shape[-1])[..., rows.to(h.device), :]


def kl_sums(ref: torch.Tensor, ends_ref: Ends, hybrids: torch.Tensor, ends_top: Ends) -> np.ndarray:
    """Sums over positions of KL(P_ref || P_M) for every hybrid M: ``ref`` ``(N, H)`` and
    ``hybrids`` ``(n, N, H)`` last residual states; returns ``(n,)`` float64. About
    :data:`HEAD_ROWS` rows per output projection (several hybrids at once when N is small),
    the reference's logits computed once per position chunk and broadcast over hybrids."""
    n, n_pos, width = hybrids.shape
    out = torch.zeros(n, dtype=torch.float64)
    vocab = ends_top.head[0].shape[0]
    step = min(HEAD_ROWS, max(n_pos, 1))
    group = max(1, HEAD_ROWS // step)
    buf = torch.empty(group * step * vocab, device=hybrids.device)
    for t0 in range(0, n_pos, step):
        xa = ends_ref.logits(ref[t0 : t0 + step])[None]  # (1, t, V)
        for k0 in range(0, n, group):
            h = hybrids[k0 : k0 + group, t0 : t0 + step]
            xm = ends_top.logits(h.reshape(-1, width), buf).view(h.shape[0], -1, vocab)
            out[k0 : k0 + group] += kl_sums_from_logits(xa, xm).cpu()
    return out.numpy()


def _drift(sa: Stack, sb: Stack, floor: list[torch.Tensor], rows: torch.Tensor) -> tuple:
    """``(5, L)`` drift sums and ``(2, L, H)`` summed differences (see :class:`LayerScores`)."""
    ha = torch.stack([_at(h, rows) for h in sa.states[1:]]).double()  # (L, N, H)
    hb = torch.stack([_at(h, rows) for h in sb.states[1:]]).double()
    hf = torch.stack(floor).double()
    rows_out, deltas = [], []
    for other in (hb, hf):
        d = other - ha
        cos = (ha * other).sum(-1) / (ha.norm(dim=-1) * other.norm(dim=-1)).clamp(min=1e-300)
        rows_out.append(((d * d).sum((1, 2)), cos.sum(1)))
        deltas.append(d.sum(1))
    (d2, cos), (f2, fcos) = rows_out
    drift = torch.stack([d2, (ha * ha).sum((1, 2)), cos, f2, fcos])
    return drift.cpu().numpy(), torch.stack(deltas).cpu().numpy()


def _floor_states(model: torch.nn.Module, prompt: list[int], batch: list[list[int]]) -> list:
    """A's residual stream after each block at the scored positions, each sample run alone
    (the noise floor: the same model, another batch shape): L tensors ``(N, H)``."""
    device = next(model.parameters()).device
    per: list[list[torch.Tensor]] = []
    for r in batch:
        ids, _, pos = pad_right([prompt + r], 0, device)
        st = record_stack(model, ids, pos)
        rows = scored_rows(len(prompt), [r], ids.shape[1])
        per.append([_at(h, rows) for h in st.states[1:]])
    return [torch.cat(hs) for hs in zip(*per, strict=True)]


@torch.no_grad()
def _batch_layers(model_a: Any, model_b: Any, prompt: list[int], batch: list[list[int]]):
    device = next(model_a.parameters()).device
    ids, _, pos = pad_right([prompt + r for r in batch], 0, device)
    rows = scored_rows(len(prompt), batch, ids.shape[1])
    sa, sb = record_stack(model_a, ids, pos), record_stack(model_b, ids, pos)
    ends = {"a": Ends.of(model_a), "b": Ends.of(model_b)}
    ref = _at(sa.states[-1], rows)
    total = kl_sums(ref, ends["a"], _at(sb.states[-1], rows)[None], ends["b"])[0]
    fwd = kl_sums(ref, ends["a"], _at(triangle(sa.states, model_b, sb.calls), rows), ends["b"])
    rev = kl_sums(ref, ends["a"], _at(triangle(sb.states, model_a, sa.calls), rows), ends["a"])
    drift, delta = _drift(sa, sb, _floor_states(model_a, prompt, batch), rows)
    return LayerScores(float(total), fwd, rev, drift, delta, len(rows))


def empty_scores(model: Any) -> LayerScores:
    """Zero sums for a model's shape (a prompt whose samples are all empty)."""
    n, h = len(blocks(model)), model.config.hidden_size
    z = np.zeros
    return LayerScores(0.0, z(n + 1), z(n + 1), z((5, n)), z((2, n, h)), 0)


@torch.no_grad()
def score_layers(
    model_a: Any, model_b: Any, prompt: list[int], responses: list[list[int]]
) -> LayerScores:
    """One prompt's :class:`LayerScores` on ``responses`` (A's samples) after ``prompt``."""
    acc = empty_scores(model_a)
    todo = [r for r in responses if r]
    for start in range(0, len(todo), RESPONSE_BATCH):
        acc = acc + _batch_layers(model_a, model_b, prompt, todo[start : start + RESPONSE_BATCH])
    return acc


def layers_on(loaded: dict[str, tuple[Any, Any]], unit: LayerUnit) -> LayerScores:
    """:func:`score_layers` with a worker's two models (side -> ``(model, tokenizer)``)."""
    return score_layers(loaded["a"][0], loaded["b"][0], unit.prompt, unit.responses)


@dataclass(frozen=True)
class DirectionUnit:
    """One prompt's causal-check work: A's samples, the blocks and the unit directions
    ``(blocks, directions, H)`` to put B's component along."""

    prompt: list[int]
    responses: list[list[int]]
    blocks: list[int]
    directions: np.ndarray


def _patched(sa: Stack, sb: Stack, layer: int, dirs: torch.Tensor) -> torch.Tensor:
    """A's residual after block ``layer`` with B's component along each unit direction:
    ``(n_dir, B, S, H)``."""
    ha = sa.states[layer + 1]
    diff = sb.states[layer + 1].to(ha.dtype) - ha
    d = dirs.to(ha.dtype)
    coef = torch.einsum("bsh,nh->nbs", diff, d)
    return ha[None] + coef[..., None] * d[:, None, None, :]


@torch.no_grad()
def score_directions(model_a: Any, model_b: Any, unit: DirectionUnit) -> np.ndarray:
    """Sums over A's sample positions of KL(P_A || P_M), M = A with B's component along each
    direction at each block's output: ``(blocks, directions)`` float64."""
    out = np.zeros(unit.directions.shape[:2])
    device = next(model_a.parameters()).device
    todo = [r for r in unit.responses if r]
    ends = Ends.of(model_a)
    for start in range(0, len(todo), RESPONSE_BATCH):
        batch = todo[start : start + RESPONSE_BATCH]
        ids, _, pos = pad_right([unit.prompt + r for r in batch], 0, device)
        rows = scored_rows(len(unit.prompt), batch, ids.shape[1])
        sa, sb = record_stack(model_a, ids, pos), record_stack(model_b, ids, pos)
        ref = _at(sa.states[-1], rows)
        for i, layer in enumerate(unit.blocks):
            dirs = torch.as_tensor(unit.directions[i], device=device)
            x = run_blocks(model_a, _patched(sa, sb, layer, dirs), sa.calls, layer + 1)
            out[i] += kl_sums(ref, ends, _at(x, rows), ends)
    return out


def directions_on(loaded: dict[str, tuple[Any, Any]], unit: DirectionUnit) -> np.ndarray:
    """:func:`score_directions` with a worker's two models."""
    return score_directions(loaded["a"][0], loaded["b"][0], unit)


@torch.no_grad()
def read_out(model: Any, deltas: np.ndarray) -> np.ndarray:
    """Vectors ``(L, H)`` read out as a last residual state: the final norm (its statistics
    computed on each vector itself) and the fp32 output head: ``(L, V)`` logits."""
    device = next(model.parameters()).device
    x = torch.as_tensor(deltas, device=device).to(next(model.parameters()).dtype)
    return Ends.of(model).logits(x).cpu().numpy()


def readout_on(loaded: dict[str, tuple[Any, Any]], deltas: np.ndarray) -> np.ndarray:
    """Both models' read-outs of ``deltas``: ``(2, L, V)`` (A, then B)."""
    return np.stack([read_out(loaded[s][0], deltas) for s in ("a", "b")])
