"""Teacher forcing one response under many personas, with full-vocabulary JS and KL.

For a response r generated under persona g, every persona o's prompt is followed by r's exact
token ids; the model's next-token distributions at r's positions are compared with g's:
``JS(P_g, P_o)``, ``KL(P_g || P_o)`` and ``KL(P_o || P_g)`` per position over the whole
vocabulary in fp32 log space, then averaged over r's positions (normalised once).

Only the response positions go through the output projection, in fp32 whatever the model's
dtype (bf16 logits would add several percent of error at JS around 0.01 nats). Personas are
batched with right padding and explicit position ids; at most ``persona_batch`` personas
(default :data:`PERSONA_BATCH`) go through one forward pass and about :data:`LOGIT_BUDGET`
fp32 logits exist at once. The log-softmax and the three divergences are one fused pass over
the logits (``torch.compile``), so no normalised ``(personas, positions, vocab)`` tensor is
written.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from divscope.divergence import js_and_kls_sums_from_logits

# Personas per forward pass by default: peak memory stops growing with the persona count.
PERSONA_BATCH = 8
# fp32 logits held at once (elements; 2**23 is 32 MiB): sets the positions per chunk. Small
# enough to stay in cache between the output projection and the fused divergence pass (on
# 2 CPU cores 8 personas x 32 positions x 49k vocab took 0.55 s where 128 positions took
# 0.78 s), with at least ``MIN_HEAD_ROWS`` rows per projection so the matmul stays efficient.
LOGIT_BUDGET = 2**23
MIN_HEAD_ROWS = 128


@dataclass
class UnitScores:
    """One response scored under N personas.

    Attributes:
        js: ``(N,)`` mean over positions of JS(P_g, P_o), nats.
        kl_fwd: ``(N,)`` mean of KL(P_g || P_o).
        kl_rev: ``(N,)`` mean of KL(P_o || P_g).
        n_tokens: Response positions scored.
        hidden: ``(N, n_layers, H)`` fp32 hidden states at each persona's last prompt position
            (where generation starts) at the requested layers, or None.
    """

    js: np.ndarray
    kl_fwd: np.ndarray
    kl_rev: np.ndarray
    n_tokens: int
    hidden: np.ndarray | None = None


def output_head(model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor | None, float | None]:
    """The output projection as fp32 ``(weight (V, H), bias, final logit softcap)``."""
    head = model.get_output_embeddings()
    w = head.weight.detach().float()
    b = head.bias.detach().float() if getattr(head, "bias", None) is not None else None
    cap = getattr(model.config, "final_logit_softcapping", None)
    return w, b, cap


def fp32_logits(
    h: torch.Tensor, head: tuple[torch.Tensor, torch.Tensor | None, float | None]
) -> torch.Tensor:
    """fp32 logits ``(..., V)`` of hidden states ``(..., H)`` (final softcap applied)."""
    w, b, cap = head
    logits = F.linear(h.float(), w, b)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def fp32_logprobs(
    h: torch.Tensor, head: tuple[torch.Tensor, torch.Tensor | None, float | None]
) -> torch.Tensor:
    """Log-softmax of the output projection of hidden states ``(..., H)`` in fp32."""
    return torch.log_softmax(fp32_logits(h, head), dim=-1)


def decoder(model: torch.nn.Module) -> torch.nn.Module:
    """The transformer body (whose output is the final normed hidden state)."""
    return getattr(model, model.base_model_prefix)


def pad_right(
    seqs: list[list[int]], pad_id: int, device: torch.device | str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask, position_ids)``, each ``(B, L)``, right padded."""
    length = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), length), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    pos = torch.arange(length).expand(len(seqs), length).clone()
    return ids.to(device), mask.to(device), pos.to(device)


@torch.no_grad()
def teacher_force(
    model: torch.nn.Module,
    prompts: list[list[int]],
    response: list[int],
    generator: int,
    *,
    layers: list[int] | None = None,
    persona_batch: int | None = PERSONA_BATCH,
    position_chunk: int | None = None,
    pad_id: int = 0,
    head: tuple[torch.Tensor, torch.Tensor | None, float | None] | None = None,
    profile: dict[str, float] | None = None,
) -> UnitScores:
    """Score ``response`` (token ids) under every prompt in ``prompts`` against ``generator``.

    Args:
        model: A causal LM (eval mode).
        prompts: N prompt id lists (persona o's rendered prompt, generation prompt included).
        response: The generated ids, as generated (never re-tokenised).
        generator: Index of the persona that generated ``response``.
        layers: ``hidden_states`` indices to return at the last prompt position
            (0 is the embedding output, i the output of block i; the last is after the
            final norm), or None.
        persona_batch: Personas per forward pass (None: all at once).
        position_chunk: Response positions per chunk of fp32 logits (None: as many as fit
            in :data:`LOGIT_BUDGET`).
        pad_id: Padding id (masked out; any valid id).
        head: Precomputed :func:`output_head` (recomputed when None).
        profile: If given, seconds spent in "forward", "logits" (output projection) and
            "divergence" (log-softmax and the divergences, fused) are added.

    Returns:
        :class:`UnitScores` with values for every persona (0 at ``generator``).
    """
    device = next(model.parameters()).device
    head = head or output_head(model)
    n, t = len(prompts), len(response)
    if t == 0:
        raise ValueError("empty response: nothing to teacher-force")
    body = decoder(model)
    # the generator first (its row is reused), the others by prompt length so that each
    # persona batch pads as little as possible
    order = [generator] + sorted(
        (i for i in range(n) if i != generator), key=lambda i: len(prompts[i])
    )
    size = persona_batch or n
    out_js, out_kf, out_kr = np.zeros(n), np.zeros(n), np.zeros(n)
    hidden = np.zeros((n, len(layers), model.config.hidden_size), np.float32) if layers else None
    h_gen = None
    for start in range(0, n, size):
        chunk = order[start : start + size]
        t_fwd = time.perf_counter()
        ids, _, pos = pad_right([prompts[i] + response for i in chunk], pad_id, device)
        # Right padding: under the causal mask every real token only sees real tokens before
        # it, so no padding mask is needed (and the fast causal attention path is taken);
        # padded positions are never read.
        out = body(
            input_ids=ids,
            position_ids=pos,
            use_cache=False,
            output_hidden_states=bool(layers),
        )
        plen = torch.tensor([len(prompts[i]) for i in chunk], device=device)
        idx = plen[:, None] - 1 + torch.arange(t, device=device)[None, :]  # (B, T)
        h = out.last_hidden_state
        h_resp = torch.gather(h, 1, idx[:, :, None].expand(-1, -1, h.shape[-1]))  # (B, T, H)
        if h_gen is None:
            h_gen = h_resp[0]  # the generator comes first in `order`
        sums = torch.zeros((3, len(chunk)), dtype=torch.float64, device=device)
        t_logits = time.perf_counter()
        t_div = 0.0
        b = len(chunk)
        step = position_chunk or max(-(-MIN_HEAD_ROWS // b), LOGIT_BUDGET // (b * head[0].shape[0]))
        for t0 in range(0, t, step):
            # contiguous rows: a strided 3-d input makes the projection several times slower
            rows = h_resp[:, t0 : t0 + step].reshape(-1, h_resp.shape[-1])
            x_o = fp32_logits(rows, head).view(b, -1, head[0].shape[0])  # (B, t, V)
            # the generator is row 0 of the first batch; later batches recompute its row
            x_g = x_o[:1] if start == 0 else fp32_logits(h_gen[None, t0 : t0 + step], head)
            t_d = time.perf_counter()
            sums += js_and_kls_sums_from_logits(x_g, x_o)  # (3, B), float64
            t_div += time.perf_counter() - t_d
        if profile is not None:
            done = time.perf_counter()
            profile["forward"] = profile.get("forward", 0.0) + t_logits - t_fwd
            profile["logits"] = profile.get("logits", 0.0) + done - t_logits - t_div
            profile["divergence"] = profile.get("divergence", 0.0) + t_div
        means = (sums / t).cpu().numpy()
        for j, i in enumerate(chunk):
            out_js[i], out_kf[i], out_kr[i] = means[:, j]
        if layers:
            hs = out.hidden_states
            rows = torch.arange(len(chunk), device=device)
            for k, layer in enumerate(layers):
                vec = hs[layer][rows, plen - 1].float().cpu().numpy()
                for j, i in enumerate(chunk):
                    hidden[i, k] = vec[j]
    out_js[generator] = out_kf[generator] = out_kr[generator] = 0.0  # same row: exactly 0
    return UnitScores(out_js, out_kf, out_kr, t, hidden)


@torch.no_grad()
def response_logprobs(
    model: torch.nn.Module,
    prompt: list[int],
    response: list[int],
    head: tuple[torch.Tensor, torch.Tensor | None, float | None] | None = None,
) -> torch.Tensor:
    """fp32 log-probabilities ``(T, V)`` of the model's next-token distributions at the
    positions that predict ``response`` after ``prompt`` (teacher-forced, one sequence)."""
    device = next(model.parameters()).device
    ids = torch.tensor([prompt + response], device=device)
    h = decoder(model)(input_ids=ids, use_cache=False).last_hidden_state[0]
    return fp32_logprobs(
        h[len(prompt) - 1 : len(prompt) - 1 + len(response)], head or output_head(model)
    )
