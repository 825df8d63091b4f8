"""Divergence losses for fine-tuning: exact, stable, differentiable and memory-lean.

All functions take **logits** (log-softmax is applied inside; log-probabilities work too,
since log-softmax is idempotent on them) of shape ``(..., vocab)``, compute in fp32 (float64
when given float64) whatever the input dtype, and reduce over positions:

* ``reduction="none"``: per position, shape ``(...)``;
* ``"sum"``: sum over unmasked positions;
* ``"mean"``: mean over unmasked positions (``mask`` is a boolean or 0/1 tensor of shape
  ``(...)``; positions where it is 0 are ignored).

``temperature`` divides both inputs' logits before the softmax. Units are nats.

Formulas (P from ``p_logits``, Q from ``q_logits``):

* ``kl_divergence``: ``KL(P||Q) = sum_x P(x) (log P(x) - log Q(x))``. Terms with P(x) = 0
  are 0 (also where Q(x) = 0). Where Q excludes a token P allows, KL is ``+inf`` (the true
  value); masking the same tokens in both stays finite.
* ``js_divergence``: ``JS = 0.5 KL(P||M) + 0.5 KL(Q||M)``, ``log M = logaddexp(lp, lq) - ln 2``;
  always finite, in ``[0, ln 2]``.
* ``generalized_jsd``: with ``M_b = b P + (1 - b) Q``,
  ``JSD_b = b KL(P||M_b) + (1 - b) KL(Q||M_b)``, which goes to 0 at both ends. divscope
  returns it **scaled** by ``1 / (b (1 - b))``:
  ``D_b = KL(P||M_b) / (1 - b) + KL(Q||M_b) / b``. ``D_b`` is continuous on ``[0, 1]`` with
  ``D_0 = KL(P||Q)``, ``D_1 = KL(Q||P)`` and ``D_1/2 = 4 JS``. (``scaled=False`` gives the raw
  ``JSD_b``.) Computed as ``KL(Q||M_b) = sum Q g(b expm1(lp - lq))`` and
  ``KL(P||M_b) = sum P g((1 - b) expm1(lq - lp))`` with ``g(u) = u - log1p(u) >= 0`` (the
  first-order terms sum to zero exactly), which avoids the cancellation of the naive form.
  In float32 the scaled value near the ends still loses about 3e-3 relative for far-apart
  distributions (``KL(Q||M_b) / b`` divides a sum of tiny terms by a tiny ``b``), so for
  ``min(b, 1 - b) < 0.01`` float32 inputs are computed in float64 and the result cast back
  (``tests/test_losses.py`` checks 1e-6 and 1 - 1e-6 against a float64 reference).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any, Literal

import torch

LN2 = math.log(2.0)
TAIL_FLOOR = 1e-12  # smallest tail bucket mass in the top-k variants (below: rounding)
Reduction = Literal["none", "sum", "mean"]


# ---------------------------------------------------------------------------- helpers


def _compute_dtype(*xs: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(x.dtype == torch.float64 for x in xs) else torch.float32


def _logprobs(logits: torch.Tensor, temperature: float, dtype: torch.dtype) -> torch.Tensor:
    x = logits.to(dtype)
    if temperature != 1.0:
        x = x / temperature
    return torch.log_softmax(x, dim=-1)


def _check_pair(p: torch.Tensor, q: torch.Tensor, mask: torch.Tensor | None) -> None:
    if p.shape != q.shape:
        raise ValueError(
            f"p_logits {tuple(p.shape)} and q_logits {tuple(q.shape)} must have the "
            "same shape (..., vocab)"
        )
    if mask is not None and tuple(mask.shape) != tuple(p.shape[:-1]):
        raise ValueError(
            f"mask {tuple(mask.shape)} must have the logits' shape without the "
            f"vocabulary axis, {tuple(p.shape[:-1])}"
        )


def _pair_logprobs(
    p_logits: torch.Tensor, q_logits: torch.Tensor, mask: torch.Tensor | None, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Checked, widened log-softmax of both inputs."""
    _check_pair(p_logits, q_logits, mask)
    dt = _compute_dtype(p_logits, q_logits)
    return _logprobs(p_logits, temperature, dt), _logprobs(q_logits, temperature, dt)


def reduce(
    per_position: torch.Tensor, mask: torch.Tensor | None, reduction: Reduction
) -> torch.Tensor:
    """Apply a reduction over positions (see the module docstring)."""
    if reduction == "none":
        return per_position if mask is None else per_position * mask.to(per_position.dtype)
    if mask is None:
        return per_position.sum() if reduction == "sum" else per_position.mean()
    m = mask.to(torch.bool)
    vals = torch.where(m, per_position, torch.zeros_like(per_position))
    if reduction == "sum":
        return vals.sum()
    if reduction == "mean":
        return vals.sum() / m.sum().clamp(min=1)
    raise ValueError(f"reduction must be 'none', 'sum' or 'mean', not {reduction!r}")


def _plogratio(lp: torch.Tensor, lq: torch.Tensor) -> torch.Tensor:
    """``P (log P - log Q)`` elementwise: 0 where P = 0, with no NaN in values or gradients."""
    p_pos = lp > float("-inf")
    safe_lp = torch.where(p_pos, lp, torch.zeros_like(lp))
    safe_lq = torch.where(p_pos, lq, torch.zeros_like(lq))
    return torch.where(p_pos, safe_lp.exp() * (safe_lp - safe_lq), torch.zeros_like(lp))


def kl_from_logprobs(lp: torch.Tensor, lq: torch.Tensor) -> torch.Tensor:
    """KL(P||Q) over the last axis from log-probabilities. ``(..., V) -> (...)``."""
    return _plogratio(lp, lq).sum(-1)


def js_from_logprobs(lp: torch.Tensor, lq: torch.Tensor) -> torch.Tensor:
    """JS(P, Q) over the last axis from log-probabilities. ``(..., V) -> (...)``."""
    finfo = torch.finfo(lp.dtype)
    # clamp -inf to the smallest finite value for the mixture only: logaddexp(-inf, -inf)
    # has a NaN gradient; those entries carry no mass and contribute 0 either way
    lm = torch.logaddexp(lp.clamp(min=finfo.min), lq.clamp(min=finfo.min)) - LN2
    js = 0.5 * _plogratio(lp, lm).sum(-1) + 0.5 * _plogratio(lq, lm).sum(-1)
    return js.clamp(0.0, LN2)


def _weighted_g(lw: torch.Tensor, d: torch.Tensor, scale: float) -> torch.Tensor:
    """``W * g(scale * expm1(d))`` with W = exp(lw), d = lv - lw, g(u) = u - log1p(u).

    Stable everywhere: a series for small |u|, ``W u = scale (V - W)`` (no overflow) with a
    softplus for large d, and 0 where W = 0. NaN-free gradients (every branch gets inputs
    from its own safe range).
    """
    w_pos = lw > float("-inf")
    d = torch.where(w_pos, d, torch.zeros_like(d))  # W = 0: term is 0, keep d finite
    big = d > 30.0
    d_small = torch.where(big, torch.zeros_like(d), d)
    u = scale * torch.expm1(d_small)
    tiny = u.abs() < 1e-3
    u_t = torch.where(tiny, u, torch.zeros_like(u))
    series = u_t * u_t * (0.5 - u_t * (1 / 3 - u_t * (0.25 - u_t / 5)))
    u_d = torch.where(tiny, torch.full_like(u, 0.5), u)
    direct = u_d - torch.log1p(u_d)
    g_small = torch.where(tiny, series, direct)
    w = torch.where(w_pos, lw, torch.zeros_like(lw)).exp()
    term_small = w * g_small
    # large d: W g(u) = W u - W log1p(u) = scale (V - W) - W softplus(log u),
    # log u = log(scale) + d + log(1 - exp(-d))
    d_big = torch.where(big, d, torch.full_like(d, 31.0))
    log_u = math.log(scale) + d_big + torch.log(-torch.expm1(-d_big))
    v = (torch.where(w_pos, lw, torch.zeros_like(lw)) + d_big).exp()  # V = W e^d
    term_big = scale * (v - w) - w * torch.nn.functional.softplus(log_u)
    out = torch.where(big, term_big, term_small)
    return torch.where(w_pos, out, torch.zeros_like(out))


def gjsd_from_logprobs(
    lp: torch.Tensor, lq: torch.Tensor, beta: float, scaled: bool = True
) -> torch.Tensor:
    """Generalized JSD (see the module docstring) from log-probabilities. ``(..., V) -> (...)``."""
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], not {beta}")
    if beta == 0.0:
        return kl_from_logprobs(lp, lq) if scaled else torch.zeros(lp.shape[:-1], dtype=lp.dtype)
    if beta == 1.0:
        return kl_from_logprobs(lq, lp) if scaled else torch.zeros(lp.shape[:-1], dtype=lp.dtype)
    if min(beta, 1.0 - beta) < 0.01 and lp.dtype != torch.float64:  # see the module docstring
        return gjsd_from_logprobs(lp.double(), lq.double(), beta, scaled).to(lp.dtype)
    kl_q_m = _weighted_g(lq, lp - lq, beta).sum(-1)  # KL(Q || M_b)
    kl_p_m = _weighted_g(lp, lq - lp, 1.0 - beta).sum(-1)  # KL(P || M_b)
    if scaled:
        return (kl_p_m / (1.0 - beta) + kl_q_m / beta).clamp(min=0.0)
    return (beta * kl_p_m + (1.0 - beta) * kl_q_m).clamp(min=0.0)


# ---------------------------------------------------------------------------- public losses


def kl_divergence(
    p_logits: torch.Tensor,
    q_logits: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    reduction: Reduction = "mean",
    temperature: float = 1.0,
) -> torch.Tensor:
    """KL(P || Q) in nats over the last axis of ``(..., vocab)`` logits (see module docs)."""
    lp, lq = _pair_logprobs(p_logits, q_logits, mask, temperature)
    return reduce(kl_from_logprobs(lp, lq), mask, reduction)


def js_divergence(
    p_logits: torch.Tensor,
    q_logits: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    reduction: Reduction = "mean",
    temperature: float = 1.0,
) -> torch.Tensor:
    """Jensen-Shannon divergence in nats, in ``[0, ln 2]`` per position (see module docs)."""
    lp, lq = _pair_logprobs(p_logits, q_logits, mask, temperature)
    return reduce(js_from_logprobs(lp, lq), mask, reduction)


def generalized_jsd(
    p_logits: torch.Tensor,
    q_logits: torch.Tensor,
    beta: float,
    *,
    mask: torch.Tensor | None = None,
    reduction: Reduction = "mean",
    temperature: float = 1.0,
    scaled: bool = True,
) -> torch.Tensor:
    """Beta-skewed JSD, scaled to be continuous with KL(P||Q) at 0 and KL(Q||P) at 1."""
    lp, lq = _pair_logprobs(p_logits, q_logits, mask, temperature)
    return reduce(gjsd_from_logprobs(lp, lq, beta, scaled), mask, reduction)


# ---------------------------------------------------------------------------- top-k


def coarse_logprobs(
    model_logprobs: torch.Tensor, ref_topk_logprobs: torch.Tensor, ref_topk_indices: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Both distributions on the reference's k tokens plus one tail bucket.

    Args:
        model_logprobs: ``(..., V)`` full log-probabilities of the model.
        ref_topk_logprobs: ``(..., k)`` the reference's log-probabilities of its top-k tokens.
        ref_topk_indices: ``(..., k)`` their vocabulary indices.

    Returns:
        ``(ref, model)`` coarse log-probabilities, each ``(..., k + 1)``; the last entry is the
        tail (everything outside the k tokens). The reference's known mass is renormalised if
        rounding pushed it above 1; tails are floored at :data:`TAIL_FLOOR`.
    """
    if ref_topk_logprobs.shape != ref_topk_indices.shape:
        raise ValueError("ref_topk_logprobs and ref_topk_indices must have the same shape")
    if tuple(model_logprobs.shape[:-1]) != tuple(ref_topk_indices.shape[:-1]):
        raise ValueError(
            f"model logits {tuple(model_logprobs.shape)} and top-k "
            f"{tuple(ref_topk_indices.shape)} must agree except in the last axis"
        )
    dt = model_logprobs.dtype
    lr = ref_topk_logprobs.to(dt)
    mass = torch.logsumexp(lr, -1, keepdim=True)
    lr = torch.where(mass > 0, lr - mass, lr)  # rounding above 1: renormalise
    mass = mass.clamp(max=0.0)
    lm = torch.gather(model_logprobs, -1, ref_topk_indices.long())
    m_mass = torch.logsumexp(lm, -1, keepdim=True).clamp(max=0.0)
    # A tail below TAIL_FLOOR is rounding (k covers almost everything): flooring both keeps
    # the divergence finite, and changes it by at most ~1e-12 nats.
    floor = math.log(TAIL_FLOOR)
    ref_tail = _log1mexp(mass).clamp(min=floor)
    model_tail = _log1mexp(m_mass).clamp(min=floor)
    return torch.cat([lr, ref_tail], -1), torch.cat([lm, model_tail], -1)


def _log1mexp(a: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(a))`` for ``a <= 0``; -inf at 0; NaN-free gradients."""
    a = a.clamp(max=0.0)
    near = a > -LN2
    a_near = torch.where(near, a, torch.full_like(a, -1.0)).clamp(max=-1e-30)
    a_far = torch.where(near, torch.full_like(a, -1.0), a)
    out = torch.where(near, torch.log(-torch.expm1(a_near)), torch.log1p(-torch.exp(a_far)))
    return torch.where(a >= 0, torch.full_like(a, float("-inf")), out)


def topk_divergence(
    model_logits: torch.Tensor,
    ref_topk_logprobs: torch.Tensor,
    ref_topk_indices: torch.Tensor,
    *,
    kind: str = "kl",
    direction: str = "forward",
    beta: float | None = None,
    mask: torch.Tensor | None = None,
    reduction: Reduction = "mean",
    temperature: float = 1.0,
) -> torch.Tensor:
    """Divergence between a reference known only by its top-k and a model, on the k tokens
    plus one tail bucket per distribution.

    By the data-processing inequality the coarse value is a lower bound of the full one; it is
    never negative and equals the full value when k covers the vocabulary. ``direction``:
    ``"forward"`` = KL(ref || model), ``"reverse"`` = KL(model || ref); ``kind`` ``"js"`` and
    ``"gjsd"`` (P = ref, Q = model) as in the full versions.
    """
    dt = _compute_dtype(model_logits)
    lm_full = _logprobs(model_logits, temperature, dt)
    lr, lm = coarse_logprobs(lm_full, ref_topk_logprobs, ref_topk_indices)
    per = _divergence(lr, lm, kind, direction, beta)
    return reduce(per, mask, reduction)


def _divergence(
    lref: torch.Tensor, lmodel: torch.Tensor, kind: str, direction: str, beta: float | None
) -> torch.Tensor:
    if kind == "kl":
        if direction == "forward":
            return kl_from_logprobs(lref, lmodel)
        if direction == "reverse":
            return kl_from_logprobs(lmodel, lref)
        raise ValueError(f"direction must be 'forward' or 'reverse', not {direction!r}")
    if kind == "js":
        return js_from_logprobs(lref, lmodel)
    if kind == "gjsd":
        if beta is None:
            raise ValueError("kind='gjsd' needs beta")
        return gjsd_from_logprobs(lref, lmodel, beta)
    raise ValueError(f"kind must be 'kl', 'js' or 'gjsd', not {kind!r}")


# ---------------------------------------------------------------------------- memory-lean


class _FusedLinearDivergence(torch.autograd.Function):
    """Chunked over positions: logits exist for one chunk at a time; gradients with respect
    to the hidden states and the weight are computed in the forward pass (as in Liger-Kernel's
    fused linear losses) and scaled by the incoming gradient in backward."""

    @staticmethod
    def forward(
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        ref_hidden: torch.Tensor,
        ref_weight: torch.Tensor,
        mask: torch.Tensor | None,
        kind: str,
        direction: str,
        beta: float | None,
        chunk_size: int,
        reduction: str,
        temperature: float,
    ) -> torch.Tensor:
        n = hidden.shape[0]
        dt = _compute_dtype(hidden, weight)
        m = (
            mask.to(torch.bool)
            if mask is not None
            else torch.ones(n, dtype=torch.bool, device=hidden.device)
        )
        denom = m.sum().clamp(min=1).to(dt) if reduction == "mean" else torch.tensor(1.0, dtype=dt)
        need_w = weight.requires_grad
        grad_h = torch.zeros_like(hidden, dtype=dt)
        grad_w = torch.zeros_like(weight, dtype=dt) if need_w else None
        total = torch.zeros((), dtype=dt, device=hidden.device)
        per_pos = [] if reduction == "none" else None
        w = weight.detach().to(dt)
        rw = ref_weight.detach().to(dt)
        for s in range(0, n, chunk_size):
            h = hidden[s : s + chunk_size].detach().to(dt).requires_grad_(True)
            wc = w.requires_grad_(need_w) if need_w else w
            with torch.enable_grad():
                lm = _logprobs(h @ wc.T, temperature, dt)
                with torch.no_grad():
                    lr = _logprobs(
                        ref_hidden[s : s + chunk_size].detach().to(dt) @ rw.T, temperature, dt
                    )
                per = _divergence(lr, lm, kind, direction, beta)
                per = torch.where(m[s : s + chunk_size], per, torch.zeros_like(per))
                if per_pos is not None:
                    per_pos.append(per.detach())
                    # reduction "none" has no scalar to differentiate; grads are for the sum
                loss = per.sum() / denom
                grads = torch.autograd.grad(loss, [h, wc] if need_w else [h])
            grad_h[s : s + chunk_size] = grads[0]
            if need_w:
                grad_w += grads[1]
            total += loss.detach()
        ctx.save_for_backward(
            grad_h.to(hidden.dtype), grad_w.to(weight.dtype) if need_w else torch.empty(0)
        )
        ctx.need_w = need_w
        if per_pos is not None:
            return torch.cat(per_pos)
        return total

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple:
        grad_h, grad_w = ctx.saved_tensors
        if grad_out.dim() > 0:
            raise RuntimeError("fused_linear_divergence: reduction='none' is forward-only")
        gh = grad_h * grad_out.to(grad_h.dtype)
        gw = grad_w * grad_out.to(grad_w.dtype) if ctx.need_w else None
        return (gh, gw, None, None, None, None, None, None, None, None, None)


def fused_linear_divergence(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    ref_hidden: torch.Tensor,
    ref_weight: torch.Tensor,
    *,
    kind: str = "kl",
    direction: str = "reverse",
    beta: float | None = None,
    mask: torch.Tensor | None = None,
    reduction: Reduction = "mean",
    chunk_size: int = 256,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Divergence between a model and a reference from their hidden states and output
    embeddings, chunk by chunk over positions, so that the ``(positions, vocab)`` logits never
    exist in full (peak extra memory ~ ``chunk_size x vocab``).

    Args:
        hidden: ``(N, H)`` the model's final hidden states (flatten batch and time first).
        weight: ``(V, H)`` the model's output embedding.
        ref_hidden: ``(N, H_ref)`` the reference's hidden states (no gradient).
        ref_weight: ``(V, H_ref)`` the reference's output embedding (no gradient).
        direction: ``"forward"`` = KL(ref || model), ``"reverse"`` = KL(model || ref).

    Returns the same values as the plain path on ``hidden @ weight.T``; gradients flow to
    ``hidden`` and ``weight``.
    """
    if hidden.dim() != 2 or ref_hidden.dim() != 2:
        raise ValueError("hidden and ref_hidden must be (positions, hidden_size); flatten first")
    if hidden.shape[0] != ref_hidden.shape[0]:
        raise ValueError(
            f"hidden has {hidden.shape[0]} positions, ref_hidden {ref_hidden.shape[0]}"
        )
    if weight.shape[0] != ref_weight.shape[0]:
        raise ValueError(
            f"vocabularies differ: weight {tuple(weight.shape)}, ref_weight "
            f"{tuple(ref_weight.shape)}"
        )
    if mask is not None and tuple(mask.shape) != (hidden.shape[0],):
        raise ValueError(f"mask must have shape ({hidden.shape[0]},)")
    return _FusedLinearDivergence.apply(
        hidden,
        weight,
        ref_hidden,
        ref_weight,
        mask,
        kind,
        direction,
        beta,
        chunk_size,
        reduction,
        temperature,
    )


# ---------------------------------------------------------------------------- regularizer


RefSource = torch.Tensor | str | Callable[[Mapping[str, Any]], torch.Tensor]


class KLRegularizer:
    """A divergence penalty to a reference: ``loss = weight * divergence(ref, model)``.

    Args:
        weight: Penalty weight.
        direction: ``"forward"`` = KL(P_ref || P_model) (mode-covering, as in distillation);
            ``"reverse"`` = KL(P_model || P_ref) (the usual RLHF-style penalty).
        kind: ``"kl"``, ``"js"`` or ``"gjsd"`` (P = ref, Q = model, needs ``beta``).
        ref: Reference logits as a tensor, the name of a batch field holding them, or a
            callable ``batch -> logits`` (e.g. a frozen reference model under no_grad).
        temperature: Softmax temperature for both.

    Calling it with the model's logits ``(..., V)`` (and the batch / mask) returns
    ``(loss, metrics)``; metrics: mean, max and min per-position divergence (unmasked
    positions), the direction, the kind, the weight.
    """

    def __init__(
        self,
        weight: float,
        direction: str = "forward",
        kind: str = "kl",
        beta: float | None = None,
        *,
        ref: RefSource | None = None,
        temperature: float = 1.0,
    ) -> None:
        if direction not in ("forward", "reverse"):
            raise ValueError(f"direction must be 'forward' or 'reverse', not {direction!r}")
        if kind not in ("kl", "js", "gjsd"):
            raise ValueError(f"kind must be 'kl', 'js' or 'gjsd', not {kind!r}")
        if kind == "gjsd" and beta is None:
            raise ValueError("kind='gjsd' needs beta")
        self.weight, self.direction, self.kind, self.beta = weight, direction, kind, beta
        self.ref, self.temperature = ref, temperature

    def _ref_logits(self, batch: Mapping[str, Any] | None) -> torch.Tensor:
        if self.ref is None:
            raise ValueError("KLRegularizer has no reference (pass ref=...)")
        if isinstance(self.ref, torch.Tensor):
            return self.ref
        if isinstance(self.ref, str):
            if batch is None or self.ref not in batch:
                raise KeyError(f"the batch has no field {self.ref!r} with reference logits")
            return batch[self.ref]
        with torch.no_grad():
            return self.ref(batch or {})

    def __call__(
        self,
        logits: torch.Tensor,
        batch: Mapping[str, Any] | None = None,
        mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        ref = self._ref_logits(batch).detach()
        if ref.shape != logits.shape:
            raise ValueError(
                f"reference logits {tuple(ref.shape)} and model logits "
                f"{tuple(logits.shape)} must have the same shape (..., vocab)"
            )
        lr, lm = _pair_logprobs(ref, logits, mask, self.temperature)
        per = _divergence(lr, lm, self.kind, self.direction, self.beta)
        loss = self.weight * reduce(per, mask, "mean")
        sel = per.detach()[mask.to(torch.bool)] if mask is not None else per.detach().flatten()
        metrics = {
            "mean": float(sel.mean()) if sel.numel() else float("nan"),
            "max": float(sel.max()) if sel.numel() else float("nan"),
            "min": float(sel.min()) if sel.numel() else float("nan"),
            "direction": self.direction,
            "kind": self.kind,
            "weight": self.weight,
        }
        return loss, metrics
