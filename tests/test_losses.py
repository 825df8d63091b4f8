"""divscope.divergence.losses against torch.distributions, scipy and brute force; gradients; edge cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.spatial.distance import jensenshannon
from scipy.special import log_softmax
from scipy.stats import entropy

from divscope.divergence.losses import (
    LN2,
    KLRegularizer,
    fused_linear_divergence,
    generalized_jsd,
    js_divergence,
    kl_divergence,
    topk_divergence,
)

Cat = torch.distributions.Categorical


def _pair(seed=0, shape=(3, 5, 40), scale=2.0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(shape, generator=g, dtype=dtype) * scale,
        torch.randn(shape, generator=g, dtype=dtype) * scale,
    )


@pytest.mark.parametrize("scale", [1.0, 5.0, 50.0, 1e4])  # up to near one-hot and huge logits
def test_kl_matches_torch_distributions_and_scipy(scale):
    p, q = _pair(1, scale=scale, dtype=torch.float64)
    ours = kl_divergence(p, q, reduction="none")
    ref = torch.distributions.kl_divergence(Cat(logits=p), Cat(logits=q))
    if scale < 1e4:
        torch.testing.assert_close(ours, ref, rtol=1e-9, atol=1e-9)
    else:  # Q's probabilities underflow to 0: torch.distributions says inf, the truth is finite
        assert torch.isinf(ref).any()
        lp, lq = log_softmax(p.numpy(), -1), log_softmax(q.numpy(), -1)
        np.testing.assert_allclose(ours.numpy(), (np.exp(lp) * (lp - lq)).sum(-1), rtol=1e-12)
    pp, qq = torch.softmax(p, -1).numpy(), torch.softmax(q, -1).numpy()
    if scale <= 50:
        np.testing.assert_allclose(
            ours.numpy().ravel(),
            [entropy(a, b) for a, b in zip(pp.reshape(-1, 40), qq.reshape(-1, 40), strict=True)],
            rtol=1e-8,
            atol=1e-10,
        )
    assert (ours >= 0).all() and torch.isfinite(ours).all()


def test_js_matches_scipy_symmetric_and_bounded():
    p, q = _pair(2, dtype=torch.float64)
    js = js_divergence(p, q, reduction="none")
    ref = [
        jensenshannon(a, b) ** 2
        for a, b in zip(
            torch.softmax(p, -1).reshape(-1, 40).numpy(),
            torch.softmax(q, -1).reshape(-1, 40).numpy(),
            strict=True,
        )
    ]
    np.testing.assert_allclose(js.numpy().ravel(), ref, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(js, js_divergence(q, p, reduction="none"))
    assert (js >= 0).all() and (js <= LN2).all()
    far = torch.full((1, 4), -1e4)
    a, b = far.clone(), far.clone()
    a[0, 0], b[0, 1] = 0, 0  # disjoint supports: JS = ln 2 exactly
    assert js_divergence(a, b).item() == pytest.approx(LN2, abs=1e-6)
    assert js_divergence(p, p).abs().item() < 1e-12 and kl_divergence(p, p).abs().item() < 1e-12


def test_log_probabilities_as_input_give_the_same_result():
    p, q = _pair(3)
    torch.testing.assert_close(
        kl_divergence(torch.log_softmax(p, -1), torch.log_softmax(q, -1)), kl_divergence(p, q)
    )


def test_bf16_inputs_are_computed_in_fp32():
    p, q = _pair(4)
    pb, qb = p.bfloat16(), q.bfloat16()
    out = kl_divergence(pb, qb, reduction="none")
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, kl_divergence(pb.float(), qb.float(), reduction="none"))


def test_masked_vocabulary_gives_no_nan_or_inf():
    p, q = _pair(5)
    p, q = p.clone().requires_grad_(True), q.clone().requires_grad_(True)
    vocab_mask = torch.zeros(40, dtype=torch.bool)
    vocab_mask[::3] = True
    for pm, qm in ((True, True), (True, False)):  # masked in both, masked in P only
        pl = p.masked_fill(vocab_mask, float("-inf")) if pm else p
        ql = q.masked_fill(vocab_mask, float("-inf")) if qm else q
        for fn in (kl_divergence, js_divergence, lambda a, b: generalized_jsd(a, b, 0.3)):
            val = fn(pl, ql)
            gp, gq = torch.autograd.grad(val, [p, q], retain_graph=True)
            assert torch.isfinite(val) and torch.isfinite(gp).all() and torch.isfinite(gq).all()
            if pm:
                assert (gp[..., vocab_mask] == 0).all()
    # Q excludes tokens P allows: KL is +inf (the true value), JS stays finite
    ql = q.masked_fill(vocab_mask, float("-inf"))
    assert kl_divergence(p, ql).item() == math.inf
    js = js_divergence(p, ql)
    assert torch.isfinite(js)
    assert torch.isfinite(torch.autograd.grad(js, [p])[0]).all()


def test_gradcheck_float64():
    p, q = _pair(6, shape=(2, 3, 7), dtype=torch.float64)
    p.requires_grad_(True)
    q.requires_grad_(True)
    mask = torch.tensor([[1, 0, 1], [1, 1, 0]])
    for fn in (
        lambda a, b: kl_divergence(a, b, mask=mask),
        lambda a, b: js_divergence(a, b, temperature=1.7),
        lambda a, b: generalized_jsd(a, b, 0.3),
        lambda a, b: generalized_jsd(a, b, 1e-4),
        lambda a, b: generalized_jsd(a, b, 0.5, scaled=False),
    ):
        assert torch.autograd.gradcheck(fn, (p, q))


def _gjsd_brute(p, q, b):
    """The defining formula in float64 probability space."""
    P, Q = torch.softmax(p.double(), -1), torch.softmax(q.double(), -1)
    M = b * P + (1 - b) * Q
    kl = lambda a, c: (a * (a.log() - c.log())).sum(-1)  # noqa: E731
    return b * kl(P, M) + (1 - b) * kl(Q, M)


def test_generalized_jsd_convention_and_continuity():
    p, q = _pair(7, dtype=torch.float64)
    for b in (0.1, 0.3, 0.5, 0.9):
        raw = generalized_jsd(p, q, b, reduction="none", scaled=False)
        torch.testing.assert_close(raw, _gjsd_brute(p, q, b), rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(generalized_jsd(p, q, b, reduction="none"), raw / (b * (1 - b)))
    torch.testing.assert_close(generalized_jsd(p, q, 0.5), 4 * js_divergence(p, q))
    # Continuity at both ends: the deviation from the endpoint KL shrinks linearly with eps
    # (its slope is a chi-square-like term, large when P and Q differ a lot), and fp32 gives
    # the float64 value of the same inputs (no cancellation near the ends).
    p, q = _pair(8)
    p64, q64 = p.double(), q.double()
    for end, kl_end in ((0.0, kl_divergence(p64, q64)), (1.0, kl_divergence(q64, p64))):
        assert generalized_jsd(p64, q64, end) == kl_end
        devs = []
        for eps in (1e-4, 1e-5, 1e-6):
            b = eps if end == 0.0 else 1.0 - eps
            d64 = generalized_jsd(p64, q64, b).item()
            assert generalized_jsd(p, q, b).item() == pytest.approx(d64, rel=2e-5)
            devs.append(abs(d64 - kl_end.item()))
        assert devs[2] < 2e-3 * kl_end.item()
        assert devs[1] / devs[2] == pytest.approx(10, rel=0.05)
        assert devs[0] / devs[1] == pytest.approx(10, rel=0.2)


def test_topk_with_full_vocabulary_equals_the_full_value_and_is_a_lower_bound():
    ref, model = _pair(9, shape=(4, 30))
    lr = torch.log_softmax(ref, -1)
    for k in (30, 10, 3, 1):
        vals, idx = lr.topk(k, -1)
        for kind, direction, full in (
            ("kl", "forward", kl_divergence(ref, model, reduction="none")),
            ("kl", "reverse", kl_divergence(model, ref, reduction="none")),
            ("js", "forward", js_divergence(ref, model, reduction="none")),
            ("gjsd", "forward", generalized_jsd(ref, model, 0.3, reduction="none")),
        ):
            got = topk_divergence(
                model, vals, idx, kind=kind, direction=direction, beta=0.3, reduction="none"
            )
            assert (got >= 0).all()
            if k == 30:
                torch.testing.assert_close(got, full, rtol=1e-4, atol=1e-5)
            else:
                assert (got <= full + 1e-5).all()


def test_topk_brute_force_coarse_kl():
    ref, model = _pair(10, shape=(1, 12), dtype=torch.float64)
    vals, idx = torch.log_softmax(ref, -1).topk(4, -1)
    R, M = torch.softmax(ref, -1)[0], torch.softmax(model, -1)[0]
    known = idx[0].tolist()
    r = [R[i].item() for i in known] + [1 - sum(R[i].item() for i in known)]
    m = [M[i].item() for i in known] + [1 - sum(M[i].item() for i in known)]
    assert topk_divergence(model, vals, idx).item() == pytest.approx(entropy(r, m), rel=1e-9)


@pytest.mark.parametrize(
    "kind,direction", [("kl", "reverse"), ("kl", "forward"), ("js", "forward"), ("gjsd", "forward")]
)
def test_fused_path_equals_the_plain_path(kind, direction):
    g = torch.Generator().manual_seed(11)
    n, h, v = 37, 16, 50
    hidden = torch.randn(n, h, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(v, h, generator=g, dtype=torch.float64, requires_grad=True)
    ref_h = torch.randn(n, h, generator=g, dtype=torch.float64)
    ref_w = torch.randn(v, h, generator=g, dtype=torch.float64)
    mask = torch.rand(n, generator=g) > 0.2
    fused = fused_linear_divergence(
        hidden,
        weight,
        ref_h,
        ref_w,
        kind=kind,
        direction=direction,
        beta=0.3,
        mask=mask,
        chunk_size=8,
    )
    gh, gw = torch.autograd.grad(fused * 2.5, [hidden, weight])
    ref_logits = ref_h @ ref_w.T
    logits = hidden @ weight.T
    if kind == "kl":
        a, b = (ref_logits, logits) if direction == "forward" else (logits, ref_logits)
        plain = kl_divergence(a, b, mask=mask)
    elif kind == "js":
        plain = js_divergence(ref_logits, logits, mask=mask)
    else:
        plain = generalized_jsd(ref_logits, logits, 0.3, mask=mask)
    ph, pw = torch.autograd.grad(plain * 2.5, [hidden, weight])
    torch.testing.assert_close(fused, plain, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gh, ph, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(gw, pw, rtol=1e-9, atol=1e-12)


def test_regularizer_sources_metrics_and_errors():
    ref, model = _pair(12)
    model.requires_grad_(True)
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[0, 0] = False
    reg = KLRegularizer(0.5, "forward", ref=ref)
    loss, metrics = reg(model, mask=mask)
    per = kl_divergence(ref, model, reduction="none")  # forward = KL(ref || model)
    assert loss.item() == pytest.approx(0.5 * per[mask].mean().item(), rel=1e-6)
    assert metrics["max"] == pytest.approx(per[mask].max().item(), rel=1e-6)
    assert metrics["min"] == pytest.approx(per[mask].min().item(), rel=1e-6)
    assert metrics["direction"] == "forward" and metrics["kind"] == "kl"
    loss.backward()
    assert torch.isfinite(model.grad).all()
    rev, _ = KLRegularizer(1.0, "reverse", ref="ref_logits")(model, {"ref_logits": ref})
    assert rev.item() == pytest.approx(kl_divergence(model, ref).item(), rel=1e-6)
    calls = []
    js_reg = KLRegularizer(1.0, kind="js", ref=lambda batch: calls.append(1) or ref)
    assert js_reg(model)[0].item() == pytest.approx(js_divergence(ref, model).item(), rel=1e-6)
    assert calls == [1]
    with pytest.raises(ValueError, match="same shape"):
        reg(model[..., :10])
    with pytest.raises(KeyError, match="no field"):
        KLRegularizer(1.0, ref="missing")(model, {})
    with pytest.raises(ValueError, match="needs beta"):
        KLRegularizer(1.0, kind="gjsd")
    with pytest.raises(ValueError, match="mask"):
        kl_divergence(ref, model, mask=torch.ones(3, 4))


@pytest.mark.parametrize("beta", [1e-6, 1 - 1e-6, 1e-3])
def test_generalized_jsd_float32_keeps_precision_near_the_ends(beta):
    """Far-apart distributions in float32 at extreme beta: within 1e-5 (relative) of the same
    inputs computed in float64 (it was 2.8e-3 before the float64 path)."""
    torch.manual_seed(0)
    p = torch.randn(64, 500) * 6
    q = torch.randn(64, 500) * 6
    got = generalized_jsd(p, q, beta, reduction="none")
    ref = generalized_jsd(p.double(), q.double(), beta, reduction="none")
    assert got.dtype == torch.float32
    rel = ((got.double() - ref).abs() / ref.abs().clamp(min=1e-12)).max().item()
    assert rel < 1e-5, rel


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_kl_sums_from_logits_matches_torch_distributions(dtype):
    """The KL-only fused kernel (the layer walk's) against torch.distributions summed over
    positions, with the reference broadcast over hybrids, masked entries and self-KL 0."""
    from divscope.divergence.fused import js_and_kls_sums_from_logits, kl_sums_from_logits

    g = torch.Generator().manual_seed(7)
    xp = torch.randn(1, 6, 50, generator=g, dtype=dtype) * 4
    xq = torch.randn(3, 6, 50, generator=g, dtype=dtype) * 4
    xq[1, :, :5] = -math.inf  # Q gives no mass where P has some: KL infinite there
    xp[0, 2, 10:20] = -math.inf  # P gives none: those terms count 0
    xq[0, 2, 12] = -math.inf  # ... also where Q gives none
    ours = kl_sums_from_logits(xp, xq)
    ref = torch.distributions.kl_divergence(Cat(logits=xp.double()), Cat(logits=xq.double()))
    assert ours.dtype == torch.float64 and ours.shape == (3,)
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    for b in (0, 2):
        assert ours[b].item() == pytest.approx(ref[b].sum().item(), rel=tol)
    assert math.isinf(ours[1].item()) and ours[1].item() > 0
    assert torch.equal(kl_sums_from_logits(xq, xq), torch.zeros(3, dtype=torch.float64))
    same = js_and_kls_sums_from_logits(xp, xq[[0, 2]])[1]
    torch.testing.assert_close(ours[[0, 2]], same, rtol=tol, atol=1e-6)
