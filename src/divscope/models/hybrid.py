"""Running a decoder stack block by block, with a chosen mix of two models' blocks.

Two models that share an architecture (a base and its fine-tune, adapter or dtype variant)
have the same parts: the embeddings, decoder blocks ``0 .. L-1``, a final norm and an output
head. A *hybrid* takes some parts from one and the rest from the other. :func:`record_stack`
runs a model's own forward once and keeps its residual stream (the input to block 0 and every
block's output) and the keyword arguments the model passed each block (attention mask, rotary
position embeddings: whatever this transformers version passes), so that any block can be
re-run later on other inputs exactly as the model runs it.

:func:`triangle` runs every hybrid "``base``'s parts up to part k, ``top``'s blocks above"
at once, reusing the base's residual stream below each switch point: block j of ``top`` runs
on the j+1 hybrids that have already switched, so the L+1 hybrids cost L(L+1)/2 block
evaluations (about (L+1)/2 forward passes), batched into large matrix products.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from divscope.models.teacher_force import decoder

# Tokens per block call when hybrids are batched: bounds the activations whatever L is.
# On a CPU 4,096 (activations nearer the caches: 0.57 of the matmul peak against 0.54 at
# 16,384 on bench_layers' workload); elsewhere 16,384, bigger calls for a GPU (not timed).
BLOCK_TOKENS = {"cpu": 2**12, "other": 2**14}


def block_tokens(device: torch.device) -> int:
    """Tokens per block call on ``device`` (see :data:`BLOCK_TOKENS`)."""
    return BLOCK_TOKENS["cpu" if device.type == "cpu" else "other"]


class HybridError(ValueError):
    """A model whose decoder stack cannot be run block by block (names the fix)."""


@dataclass
class Stack:
    """One model's forward on a batch ``(B, S)``, recorded.

    Attributes:
        states: L + 1 tensors ``(B, S, H)``: the input to block 0 (the embedding output), then
            the output of each block (the residual stream after it).
        calls: Per block, the positional (after the hidden states) and keyword arguments the
            model passed it.
    """

    states: list[torch.Tensor]
    calls: list[tuple[tuple[Any, ...], dict[str, Any]]]


def blocks(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The decoder blocks of a causal LM (``model.model.layers`` for Llama-style models)."""
    layers = getattr(decoder(model), "layers", None)
    if not isinstance(layers, torch.nn.ModuleList) or not hasattr(decoder(model), "norm"):
        raise HybridError(
            f"{type(model).__name__} has no decoder blocks at model.layers and final norm at "
            "model.norm. Fix: --layers supports Llama-style transformers models"
        )
    return layers


def final_norm(model: torch.nn.Module) -> torch.nn.Module:
    """The norm between the last block and the output head."""
    return decoder(model).norm


def _first(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def record_stack(model: torch.nn.Module, ids: torch.Tensor, pos: torch.Tensor) -> Stack:
    """The model's own forward on ``ids`` (right padded, ``pos`` its position ids) with its
    residual stream and every block's call arguments kept (see :class:`Stack`)."""
    layers = blocks(model)
    states: list[torch.Tensor] = []
    calls: list[tuple[tuple[Any, ...], dict[str, Any]]] = []

    def pre(_mod: Any, args: tuple, kwargs: dict) -> None:
        h = args[0] if args else kwargs["hidden_states"]
        calls.append((args[1:], {k: v for k, v in kwargs.items() if k != "hidden_states"}))
        if not states:
            states.append(h)

    def post(_mod: Any, _args: tuple, _kwargs: dict, out: Any) -> None:
        states.append(_first(out))

    hooks = [m.register_forward_pre_hook(pre, with_kwargs=True) for m in layers]
    hooks += [m.register_forward_hook(post, with_kwargs=True) for m in layers]
    try:
        decoder(model)(input_ids=ids, position_ids=pos, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return Stack(states, calls)


def _tile(v: Any, b: int, m: int) -> Any:
    """A call argument for ``m`` copies of a batch of ``b`` rows: tensors whose first axis is
    the batch (2-d or more) are repeated; the rest broadcast or do not depend on rows."""
    if isinstance(v, torch.Tensor) and v.dim() >= 2 and v.shape[0] == b and b > 1 and m > 1:
        return v.repeat(m, *([1] * (v.dim() - 1)))
    if isinstance(v, tuple):
        return tuple(_tile(x, b, m) for x in v)
    return v


def run_block(
    block: torch.nn.Module, x: torch.Tensor, call: tuple[tuple[Any, ...], dict[str, Any]]
) -> torch.Tensor:
    """``block`` on ``x`` ``(n, B, S, H)`` (n variants of one batch), as many variants per call
    as fit in :func:`block_tokens`; returns ``(n, B, S, H)``."""
    n, b, s, _ = x.shape
    per = max(1, block_tokens(x.device) // (b * s))
    outs = []
    for v0 in range(0, n, per):
        m = min(per, n - v0)
        args = tuple(_tile(a, b, m) for a in call[0])
        kwargs = {k: _tile(v, b, m) for k, v in call[1].items()}
        h = x[v0 : v0 + m].reshape(m * b, s, -1)
        outs.append(_first(block(h, *args, **kwargs)).view(m, b, s, -1))
    return outs[0] if len(outs) == 1 else torch.cat(outs)


def run_blocks(top: torch.nn.Module, x: torch.Tensor, calls: list, first: int) -> torch.Tensor:
    """``top``'s blocks ``first .. L-1`` on ``x`` ``(n, B, S, H)`` (in ``top``'s dtype)."""
    layers = blocks(top)
    x = x.to(next(top.parameters()).dtype)
    for j in range(first, len(layers)):
        x = run_block(layers[j], x, calls[j])
    return x


@torch.no_grad()
def triangle(
    base: list[torch.Tensor],
    top: torch.nn.Module,
    calls: list,
    on_block: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """The last residual stream of every hybrid "``base``'s parts up to part k, ``top``'s
    blocks above", k = embeddings, block 0, ..., block L-1: ``(L + 1, B, S, H)``.

    Args:
        base: The base's :attr:`Stack.states` (L + 1 tensors ``(B, S, H)``).
        top: The model whose blocks run above the switch point.
        calls: ``top``'s :attr:`Stack.calls` on the same batch.
        on_block: Called with each block index as it finishes (progress).
    """
    dtype = next(top.parameters()).dtype
    layers = blocks(top)
    alive = base[0][None].to(dtype)  # hybrid "base's embeddings", before block 0
    for j in range(len(layers)):
        x = run_block(layers[j], alive, calls[j])
        alive = torch.cat([x, base[j + 1][None].to(dtype)])
        if on_block is not None:
            on_block(j)
    return alive
