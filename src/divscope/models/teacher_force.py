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

The prompts of one question are the same for every response to it: :func:`prompt_kv` runs
each once and keeps its keys and values, and ``teacher_force(..., kv=...)`` then runs only the
response tokens against them (padded prompt slots masked, true position ids).
"""

from __future__ import annotations

import inspect
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from divscope.divergence.fused import js_and_kls_sums_from_logits

# Personas per forward pass by default: peak memory stops growing with the persona count.
PERSONA_BATCH = 8
# fp32 logits held at once (elements; 2**23 is 32 MiB): sets the positions per chunk. Small
# enough to stay in cache between the output projection and the fused divergence pass (on
# 2 CPU cores 8 personas x 32 positions x 49k vocab took 0.55 s where 128 positions took
# 0.78 s), with at least ``MIN_HEAD_ROWS`` rows per projection so the matmul stays efficient.
LOGIT_BUDGET = 2**23
MIN_HEAD_ROWS = 128
# Response tokens per pass against cached prompts: the attention mask is explicit there, so
# one pass over a long response computes attention to every later position too; in chunks the
# waste is bounded and activations stay smaller (8 x 512 tokens on 2 CPU cores: 7.5 s in one
# pass, 6.3 s in chunks of 256, 6.8 s for the one-forward path).
ANSWER_CHUNK = 256
# Bytes of cached prompt keys/values a question may hold (all its personas' prompts): above
# it the prompts are run with each response again (memory bounded by one persona batch).
# SmolLM2-135M in fp32 keeps 45 KiB per prompt token: 112 personas x 100 tokens = 0.5 GiB.
PROMPT_KV_BUDGET = 2**31


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
    h: torch.Tensor,
    head: tuple[torch.Tensor, torch.Tensor | None, float | None],
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """fp32 logits ``(..., V)`` of hidden states ``(..., H)`` (final softcap applied).

    ``out``: a buffer of at least ``h.numel() // H * V`` fp32 elements to write into (reused
    across calls it saves the page faults of a fresh large allocation each time).
    """
    w, b, cap = head
    if out is None:
        logits = F.linear(h.float(), w, b)
    else:
        rows = h.reshape(-1, h.shape[-1]).float()
        logits = out[: rows.shape[0] * w.shape[0]].view(rows.shape[0], w.shape[0])
        torch.mm(rows, w.t(), out=logits)
        if b is not None:
            logits += b
        logits = logits.view(*h.shape[:-1], w.shape[0])
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def fp32_logprobs(
    h: torch.Tensor, head: tuple[torch.Tensor, torch.Tensor | None, float | None]
) -> torch.Tensor:
    """Log-softmax of the output projection of hidden states ``(..., H)`` in fp32."""
    return torch.log_softmax(fp32_logits(h, head), dim=-1)


def decoder(model: torch.nn.Module) -> torch.nn.Module:
    """The transformer body (whose output is the final normed hidden state); a PEFT model is
    unwrapped first (its adapter layers stay active)."""
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
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


@dataclass
class PromptKV:
    """Every persona's prompt for one question, run once, for all the responses to it.

    Each persona's rendered prompt is the same for every response to a question, so its
    keys and values are computed once (:func:`prompt_kv`) and each teacher-forcing pass runs
    only the response tokens against them (for N personas answering, N prompt passes instead
    of N²). Memory: one key and one value vector per layer, prompt token and persona.

    Attributes:
        keys: Per layer ``(N, kv_heads, L, head_dim)``, right padded to the longest prompt L.
        values: Per layer, like ``keys``.
        last: ``(N, H)`` final hidden state at each prompt's last position (the one that
            predicts a response's first token).
        lengths: ``(N,)`` prompt lengths (long).
        prompts: The prompt ids (to check that they are the ones being scored).
        layers: The ``hidden_states`` indices of ``hidden``, or None.
        hidden: ``(N, n_layers, H)`` fp32 hidden states at ``layers`` at the last prompt
            position, or None.
    """

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    last: torch.Tensor
    lengths: torch.Tensor
    prompts: list[list[int]]
    layers: list[int] | None = None
    hidden: np.ndarray | None = None


def _sliding_window(model: torch.nn.Module) -> int | None:
    """The attention window of the model's sliding-window layers, or None if it has none."""
    cfg = model.config
    window = getattr(cfg, "sliding_window", None)
    types = getattr(cfg, "layer_types", None)
    sliding = "sliding_attention" in types if types else getattr(cfg, "use_sliding_window", True)
    return window if window and sliding else None


def prompt_kv_bytes(model: torch.nn.Module, tokens: int) -> int:
    """Bytes of keys and values that ``tokens`` cached prompt positions take (all layers)."""
    cfg = model.config
    heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    item = torch.finfo(model.dtype).bits // 8
    return 2 * cfg.num_hidden_layers * heads * head_dim * item * tokens


def reuses_prompt_kv(model: torch.nn.Module, total_length: int) -> bool:
    """Whether responses can run against cached prompt keys/values up to ``total_length``
    (prompt + response) tokens: always, unless sliding-window layers would have to drop some
    (padded cache slots then shift the window; the full forward is used instead)."""
    window = _sliding_window(model)
    return window is None or total_length < window


@torch.no_grad()
def prompt_kv(
    model: torch.nn.Module,
    prompts: list[list[int]],
    *,
    layers: list[int] | None = None,
    persona_batch: int | None = PERSONA_BATCH,
    pad_id: int = 0,
) -> PromptKV | None:
    """Run each prompt once (right padded batches) and keep its keys, values and last state.

    Returns None when the model's sliding window is too short to keep whole prompts (see
    :func:`reuses_prompt_kv`) or the cache would exceed :data:`PROMPT_KV_BUDGET` bytes
    (N prompts padded to the longest); :func:`teacher_force` then runs prompt and response
    together.

    Args:
        model: A causal LM (eval mode).
        prompts: N prompt id lists (generation prompt included).
        layers: ``hidden_states`` indices to keep at the last prompt position, or None.
        persona_batch: Prompts per forward pass (None: all at once).
        pad_id: Padding id (any valid id; padded slots are never attended to).
    """
    from transformers import DynamicCache

    device = next(model.parameters()).device
    body = decoder(model)
    n, longest = len(prompts), max(len(p) for p in prompts)
    if not reuses_prompt_kv(model, longest + 1):
        return None
    if prompt_kv_bytes(model, n * longest) > PROMPT_KV_BUDGET:
        return None
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    keys: list[torch.Tensor] = []
    values: list[torch.Tensor] = []
    last = torch.zeros((n, model.config.hidden_size), dtype=model.dtype, device=device)
    hidden = np.zeros((n, len(layers), model.config.hidden_size), np.float32) if layers else None
    size = persona_batch or n
    for start in range(0, n, size):
        rows = list(range(start, min(n, start + size)))
        ids, _, pos = pad_right([prompts[i] for i in rows], pad_id, device)
        out = body(
            input_ids=ids,
            position_ids=pos,
            **cache_kwarg(body, DynamicCache(config=model.config)),
            use_cache=True,
            output_hidden_states=bool(layers),
        )
        cache = returned_cache(out)
        for li, layer in enumerate(cache.layers):
            if start == 0:
                shape = (n, layer.keys.shape[1], longest, layer.keys.shape[3])
                keys.append(layer.keys.new_zeros(shape))
                values.append(layer.values.new_zeros(shape))
            keys[li][start : start + len(rows), :, : ids.shape[1]] = layer.keys
            values[li][start : start + len(rows), :, : ids.shape[1]] = layer.values
        at = lengths[rows] - 1
        sel = torch.arange(len(rows), device=device)
        last[rows] = out.last_hidden_state[sel, at]
        if layers:
            for k, layer in enumerate(layers):
                hidden[rows, k] = out.hidden_states[layer][sel, at].float().cpu().numpy()
    prompts = [list(p) for p in prompts]
    return PromptKV(keys, values, last, lengths, prompts, list(layers) if layers else None, hidden)


def cache_kwarg(body: torch.nn.Module, cache: Any) -> dict[str, Any]:
    """The KV cache as the keyword this transformers takes: ``cache`` (the current API), or
    ``past_key_values`` on versions before the rename."""
    params = inspect.signature(body.forward).parameters
    return {"cache" if "cache" in params else "past_key_values": cache}


def returned_cache(out: Any) -> Any:
    """The KV cache a forward returned (``out.cache``; ``out.past_key_values`` before the
    rename)."""
    cache = getattr(type(out), "__dataclass_fields__", {}).get("cache")
    return out.cache if cache is not None else out.past_key_values


def response_states(
    model: torch.nn.Module,
    kv: PromptKV | None,
    prompts: list[list[int]],
    rows: list[int],
    responses: list[list[int]],
    pad_id: int = 0,
) -> torch.Tensor:
    """Final hidden states ``(B, T, H)`` that predict ``responses[i]`` after
    ``prompts[rows[i]]`` (T the longest response; positions past a response's end are padding).

    With ``kv`` (:func:`prompt_kv` of ``prompts``) only the response tokens run, against the
    cached prompts; otherwise (or when the sliding window is too short) prompt and response run
    together. One scorer serves many prompts x one response (personas) and one prompt x many
    responses (a model diff).
    """
    longest = max(len(prompts[r]) + len(x) for r, x in zip(rows, responses, strict=True))
    if kv is not None and reuses_prompt_kv(model, longest):
        return _response_states_from_kv(model, kv, rows, responses)
    seqs = [prompts[r] for r in rows]
    return _response_states(decoder(model), seqs, responses, None, pad_id)[0]


def _response_states_from_kv(
    model: torch.nn.Module,
    kv: PromptKV,
    rows: list[int],
    responses: list[list[int]],
) -> torch.Tensor:
    """Final hidden states ``(B, T, H)`` that predict ``responses[i]`` after prompt
    ``rows[i]``, running only the response tokens against the cached prompt keys/values,
    :data:`ANSWER_CHUNK` tokens per pass. Shorter responses are right padded (a padded token
    is never seen by a real one under the causal mask)."""
    from transformers import DynamicCache

    device = kv.last.device
    sel = torch.tensor(rows, device=device)
    first = kv.last[sel][:, None]  # the last prompt position predicts the first token
    t = max(len(r) for r in responses)
    if t == 1:
        return first
    lengths = kv.lengths[sel]
    lp = int(lengths.max())
    cache = DynamicCache(config=model.config)
    for li, (k, v) in enumerate(zip(kv.keys, kv.values, strict=True)):
        cache.update(k[sel, :, :lp], v[sel, :, :lp], li)
    # padded prompt slots are masked; the response tokens sit after the longest prompt in
    # the cache but keep their true positions
    mask = torch.ones((len(rows), lp + t - 1), dtype=torch.long, device=device)
    mask[:, :lp] = torch.arange(lp, device=device)[None, :] < lengths[:, None]
    pos = lengths[:, None] + torch.arange(t - 1, device=device)[None, :]
    if all(r == responses[0] for r in responses):
        ids = torch.tensor(responses[0][:-1], device=device).expand(len(rows), -1)
    else:
        ids = pad_right([r[:-1] or [0] for r in responses], 0, device)[0][:, : t - 1]
    body = decoder(model)
    states = [first]
    for c0 in range(0, t - 1, ANSWER_CHUNK):
        c1 = min(t - 1, c0 + ANSWER_CHUNK)
        out = body(
            input_ids=ids[:, c0:c1],
            attention_mask=mask[:, : lp + c1],
            position_ids=pos[:, c0:c1],
            **cache_kwarg(body, cache),
            use_cache=True,
        )
        states.append(out.last_hidden_state)
    return torch.cat(states, 1)


def _response_states(
    body: torch.nn.Module,
    prompts: list[list[int]],
    responses: list[int] | list[list[int]],
    layers: list[int] | None,
    pad_id: int,
) -> tuple[torch.Tensor, np.ndarray | None]:
    """Final hidden states ``(B, T, H)`` that predict the response after each prompt (one
    right-padded forward over prompt + response; ``responses`` is one response for every
    prompt, or one per prompt), and the hidden states at ``layers`` at the last prompt position
    (``(B, n_layers, H)`` or None)."""
    device = next(body.parameters()).device
    per_row = responses if responses and isinstance(responses[0], list) else None
    resps = per_row or [responses] * len(prompts)
    t = max(len(r) for r in resps)
    ids, _, pos = pad_right([p + r for p, r in zip(prompts, resps, strict=True)], pad_id, device)
    # Right padding: under the causal mask every real token only sees real tokens before
    # it, so no padding mask is needed (and the fast causal attention path is taken);
    # padded positions are never read.
    out = body(input_ids=ids, position_ids=pos, use_cache=False, output_hidden_states=bool(layers))
    plen = torch.tensor([len(p) for p in prompts], device=device)
    idx = plen[:, None] - 1 + torch.arange(t, device=device)[None, :]  # (B, T)
    idx = idx.clamp(max=ids.shape[1] - 1)  # past a shorter response's end: padding
    h = out.last_hidden_state
    states = torch.gather(h, 1, idx[:, :, None].expand(-1, -1, h.shape[-1]))
    hidden = None
    if layers:
        rows = torch.arange(len(prompts), device=device)
        hidden = np.stack(
            [out.hidden_states[k][rows, plen - 1].float().cpu().numpy() for k in layers], 1
        )
    return states, hidden


@torch.no_grad()
def divergence_sums(
    h_o: torch.Tensor,
    h_g: torch.Tensor,
    head: tuple[torch.Tensor, torch.Tensor | None, float | None],
    *,
    reuse_first: bool,
    step: int | None = None,
) -> tuple[torch.Tensor, float]:
    """Sums over positions of JS(P_g, P_o), KL(P_g||P_o), KL(P_o||P_g), full vocabulary, nats.

    The output projection runs in fp32 into a reused buffer, ``step`` positions at a time (as
    many as fit in :data:`LOGIT_BUDGET` when None), straight into the fused divergence.

    Args:
        h_o: ``(B, T, H)`` final hidden states of B conditions over the response positions.
        h_g: ``(T, H)`` the generator's hidden states (the reference P_g).
        head: :func:`output_head` of the model.
        reuse_first: Row 0 of ``h_o`` is the generator itself: its logits are reused.
        step: Positions per chunk.

    Returns:
        ``(3, B)`` float64 sums (JS, KL(P_g||P_o), KL(P_o||P_g)) and the seconds spent in
        the divergence itself.
    """
    b, t, _ = h_o.shape
    vocab = head[0].shape[0]
    sums = torch.zeros((3, b), dtype=torch.float64, device=h_o.device)
    t_div = 0.0
    step = step or max(-(-MIN_HEAD_ROWS // b), LOGIT_BUDGET // (b * vocab))
    buf = torch.empty((b + (not reuse_first)) * min(step, t) * vocab, device=h_o.device)
    for t0 in range(0, t, step):
        # contiguous rows: a strided 3-d input makes the projection several times slower
        rows = h_o[:, t0 : t0 + step].reshape(-1, h_o.shape[-1])
        x_o = fp32_logits(rows, head, buf).view(b, -1, vocab)  # (B, t, V)
        x_g = (
            x_o[:1]
            if reuse_first
            else fp32_logits(h_g[None, t0 : t0 + step], head, buf[x_o.numel() :])
        )
        t_d = time.perf_counter()
        sums += js_and_kls_sums_from_logits(x_g, x_o)  # (3, B), float64
        t_div += time.perf_counter() - t_d
    return sums, t_div


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
    kv: PromptKV | None = None,
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
        kv: :func:`prompt_kv` of these ``prompts`` (with these ``layers``): only the response
            tokens are run, against the cached prompts (used unless the model's sliding
            window is shorter than prompt + response, see :func:`reuses_prompt_kv`).

    Returns:
        :class:`UnitScores` with values for every persona (0 at ``generator``).
    """
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
    h_gen = None
    if kv is not None:
        if kv.prompts != [list(p) for p in prompts]:
            raise ValueError("kv was built from other prompts than the ones being scored")
        if layers and kv.layers != list(layers):
            raise ValueError(f"kv holds hidden states at layers {kv.layers}, not {layers}")
        if not reuses_prompt_kv(model, int(kv.lengths.max()) + t):
            kv = None
    if not layers:
        hidden = None
    elif kv is not None:
        hidden = kv.hidden.copy()
    else:
        hidden = np.zeros((n, len(layers), model.config.hidden_size), np.float32)
    for start in range(0, n, size):
        chunk = order[start : start + size]
        t_fwd = time.perf_counter()
        if kv is not None:
            h_resp = _response_states_from_kv(model, kv, chunk, [response] * len(chunk))
        else:
            h_resp, at_layers = _response_states(
                body, [prompts[i] for i in chunk], response, layers, pad_id
            )
            if layers:
                hidden[chunk] = at_layers
        if h_gen is None:
            h_gen = h_resp[0]  # the generator comes first in `order`
        t_logits = time.perf_counter()
        sums, t_div = divergence_sums(
            h_resp, h_gen, head, reuse_first=start == 0, step=position_chunk
        )
        if profile is not None:
            done = time.perf_counter()
            profile["forward"] = profile.get("forward", 0.0) + t_logits - t_fwd
            profile["logits"] = profile.get("logits", 0.0) + done - t_logits - t_div
            profile["divergence"] = profile.get("divergence", 0.0) + t_div
        means = (sums / t).cpu().numpy()
        for j, i in enumerate(chunk):
            out_js[i], out_kf[i], out_kr[i] = means[:, j]
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
    states, _ = _response_states(decoder(model), [prompt], response, None, pad_id=0)
    return fp32_logprobs(states[0], head or output_head(model))
