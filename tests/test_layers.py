"""``divscope diff --layers``: the per-block decomposition, drift, directions and causal check
against ground truth (a float64 brute force that builds every hybrid network whole, changes
confined to known parts, a planted direction), and A patched into A bit for bit."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from divscope.diff.layers import (
    DirectionUnit,
    Ends,
    read_out,
    score_directions,
    score_layers,
)
from divscope.diff.layers_summary import contributions, leading_blocks, summarize
from divscope.models.hybrid import record_stack, triangle
from divscope.models.teacher_force import pad_right

PROMPTS = [[1, 2, 3, 4], [7, 3, 9]]
RESPONSES = [[[5, 6, 7], [8, 9, 10, 11, 12]], [[20, 21], [22, 23, 24, 25], [30]]]


def tiny(seed: int, layers: int = 4, hidden: int = 32) -> torch.nn.Module:
    """A random-weight Llama (untied head, so embeddings and head are separate parts)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=101, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        tie_word_embeddings=False,
    )  # fmt: skip
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    return model


def hybrid64(base, top, k: int):
    """The whole hybrid network in float64: ``base``'s embeddings and blocks 0..k (k = -1:
    embeddings only; k = L: everything, head included), ``top``'s other parts."""
    m = copy.deepcopy(top).double()
    b = copy.deepcopy(base).double()
    m.model.embed_tokens = b.model.embed_tokens
    for j in range(min(k + 1, len(m.model.layers))):
        m.model.layers[j] = b.model.layers[j]
    if k >= len(m.model.layers):
        m.model.norm, m.lm_head = b.model.norm, b.lm_head
    return m


def logprobs64(model, prompt, response, hook=None):
    """float64 log-probabilities ``(T, V)`` at the positions predicting ``response``."""
    with torch.no_grad():
        x = model(torch.tensor([prompt + response])).logits[0].double()
    t0 = len(prompt) - 1
    return torch.log_softmax(x, -1)[t0 : t0 + len(response)]


def kl64(lp, lq) -> float:
    return float((lp.exp() * (lp - lq)).sum())


def brute_walks(a, b, prompt, responses):
    """KL(A||B) and both walks' sums, every hybrid built whole and run end to end."""
    n = len(a.model.layers)
    a64 = copy.deepcopy(a).double()
    ref = [logprobs64(a64, prompt, r) for r in responses]

    def total(model):
        return sum(
            kl64(la, logprobs64(model, prompt, r)) for la, r in zip(ref, responses, strict=True)
        )

    fwd = [total(hybrid64(a, b, k)) for k in range(-1, n)]
    rev = [total(hybrid64(b, a, k)) for k in range(-1, n)]
    return total(copy.deepcopy(b).double()), np.array(fwd), np.array(rev)


def states64(model, prompt, responses):
    """float64 residual stream after every block at the scored positions: ``(L, N, H)``."""
    m = copy.deepcopy(model).double()
    outs = []
    for r in responses:
        got = []
        hooks = [
            blk.register_forward_hook(lambda _m, _a, o, got=got: got.append(o))
            for blk in m.model.layers
        ]
        with torch.no_grad():
            m(torch.tensor([prompt + r]))
        for h in hooks:
            h.remove()
        t0 = len(prompt) - 1
        outs.append(torch.stack([g[0, t0 : t0 + len(r)] for g in got]))
    return torch.cat(outs, 1)


def test_walks_and_drift_against_float64_brute_force():
    """Two unrelated random models: every hybrid's KL sum, KL(A||B) and the drift sums match
    whole hybrid networks run end to end in float64; the contributions sum to KL(A||B)."""
    a, b = tiny(0), tiny(1)
    for prompt, responses in zip(PROMPTS, RESPONSES, strict=True):
        got = score_layers(a, b, prompt, responses)
        total, fwd, rev = brute_walks(a, b, prompt, responses)
        assert got.kl_total == pytest.approx(total, rel=1e-5)
        np.testing.assert_allclose(got.forward, fwd, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(got.reverse, rev, rtol=1e-5, atol=1e-6)
        ha, hb = states64(a, prompt, responses), states64(b, prompt, responses)
        d = hb - ha
        np.testing.assert_allclose(got.drift[0], (d * d).sum((1, 2)).numpy(), rtol=1e-5)
        np.testing.assert_allclose(got.drift[1], (ha * ha).sum((1, 2)).numpy(), rtol=1e-5)
        cos = torch.nn.functional.cosine_similarity(ha, hb, dim=-1).sum(1)
        np.testing.assert_allclose(got.drift[2], cos.numpy(), rtol=1e-5)
        np.testing.assert_allclose(got.delta[0], d.sum(1).numpy(), rtol=1e-4, atol=1e-5)
        assert got.n_positions == sum(map(len, responses))
        cf, cr, t = contributions([got])
        assert cf.sum() == pytest.approx(t[0], rel=1e-12)
        assert cr.sum() == pytest.approx(t[0], rel=1e-12)


def test_directions_and_read_out_against_float64_brute_force():
    """The causal check's sums (A with B's component along a direction at a block's output)
    and the read-out (final norm on the vector itself, then the head) in float64."""
    a, b = tiny(0), tiny(1)
    prompt, responses = PROMPTS[0], RESPONSES[0]
    rng = np.random.default_rng(0)
    dirs = rng.standard_normal((2, 3, 32))
    dirs /= np.linalg.norm(dirs, axis=-1, keepdims=True)
    got = score_directions(a, b, DirectionUnit(prompt, responses, [1, 3], dirs))
    a64, b64 = copy.deepcopy(a).double(), copy.deepcopy(b).double()
    for i, layer in enumerate([1, 3]):
        for j in range(3):
            d = torch.tensor(dirs[i, j])
            want = 0.0
            for r in responses:
                hb = []
                hk = b64.model.layers[layer].register_forward_hook(
                    lambda _m, _a, o, hb=hb: hb.append(o)
                )
                logprobs64(b64, prompt, r)
                hk.remove()

                def patch(_m, _a, o, hb=hb[0], d=d):
                    return o + (((hb - o) @ d)[..., None] * d)

                hk = a64.model.layers[layer].register_forward_hook(patch)
                lq = logprobs64(a64, prompt, r)
                hk.remove()
                want += kl64(logprobs64(a64, prompt, r), lq)
            assert got[i, j] == pytest.approx(want, rel=1e-4, abs=1e-6)
    delta = rng.standard_normal((4, 32))
    x = torch.tensor(delta)
    w = a64.model.norm.weight
    normed = x / torch.sqrt((x * x).mean(-1, keepdim=True) + a.config.rms_norm_eps) * w
    np.testing.assert_allclose(read_out(a, delta), (normed @ a64.lm_head.weight.T).detach().numpy(),
                               rtol=1e-4, atol=1e-4)  # fmt: skip


def test_patching_a_into_a_is_bit_for_bit():
    """Every hybrid of A with (a copy of) itself reproduces A's last residual stream and
    log-probabilities exactly, so every KL and drift is exactly 0; A's own logits match the
    model's forward."""
    a = tiny(0)
    twin = copy.deepcopy(a)
    ids, _, pos = pad_right([PROMPTS[0] + r for r in RESPONSES[0]], 0, "cpu")
    sa, st = record_stack(a, ids, pos), record_stack(twin, ids, pos)
    hyb = triangle(sa.states, twin, st.calls)
    ends = Ends.of(a)
    ref = torch.log_softmax(ends.logits(sa.states[-1].reshape(-1, 32)), -1)
    for k in range(hyb.shape[0]):
        assert torch.equal(hyb[k], sa.states[-1])
        assert torch.equal(torch.log_softmax(Ends.of(twin).logits(hyb[k].reshape(-1, 32)), -1), ref)
    with torch.no_grad():
        model_logits = a(ids, position_ids=pos).logits.reshape(-1, 101)
    torch.testing.assert_close(ends.logits(sa.states[-1].reshape(-1, 32)), model_logits,
                               rtol=0, atol=1e-5)  # fmt: skip
    got = score_layers(a, twin, PROMPTS[0], RESPONSES[0])
    assert got.kl_total == 0.0 and not got.forward.any() and not got.reverse.any()
    assert not got.drift[0].any() and not got.delta.any()


def _changed(model, part: str, seed: int = 5):
    m = copy.deepcopy(model)
    torch.manual_seed(seed)
    params = {
        "head": m.lm_head.weight,
        "norm": m.model.norm.weight,
        "embeddings": m.model.embed_tokens.weight,
    }[part]
    with torch.no_grad():
        params.add_(torch.randn_like(params) * 0.5)
    return m


def _fractions(a, b):
    units = [score_layers(a, b, p, r) for p, r in zip(PROMPTS, RESPONSES, strict=True)]
    cf, cr, total = contributions(units)
    return cf.sum(0) / total.sum(), cr.sum(0) / total.sum()


@pytest.mark.parametrize("part,index", [("head", -1), ("norm", -1), ("embeddings", 0)])
def test_a_change_confined_to_one_end_is_found_there(part, index):
    """Only the head (or the final norm) changed: head_fraction 1 in both orders; only the
    embeddings: embedding_fraction 1; every block 0."""
    a = tiny(0)
    f, r = _fractions(a, _changed(a, part))
    want = np.zeros_like(f)
    want[index] = 1.0
    np.testing.assert_allclose(f, want, atol=1e-6)
    np.testing.assert_allclose(r, want, atol=1e-6)


def _planted(model, layer: int, vec: torch.Tensor):
    m = copy.deepcopy(model)
    m.model.layers[layer].register_forward_hook(lambda _m, _a, o: o + vec)
    return m


def _self_read_token(model) -> tuple[int, torch.Tensor]:
    """A token t whose unembedding row u reads out (final norm, head) with t on top."""
    w = model.lm_head.weight.detach()
    logits = torch.as_tensor(read_out(model, w.double().numpy()))
    t = int(torch.nonzero(logits.argmax(-1) == torch.arange(len(w)))[0, 0])
    return t, w[t] / w[t].norm()


def _analysis(a, b, n_random_seed: int = 0, n_blocks: int | None = 3):
    from divscope.diff.layers_run import random_directions

    prompts = [[1, 2, 3, 4], [7, 3, 9], [11, 12], [40, 41, 42]]
    responses = [[[5, 6, 7, 8], [9, 10, 11]]] * 4
    units = {
        i: score_layers(a, b, p, r) for i, (p, r) in enumerate(zip(prompts, responses, strict=True))
    }
    n = sum(u.n_positions for u in units.values())
    deltas = np.sum([u.delta[0] for u in units.values()], 0) / n
    readout = np.stack([read_out(a, deltas), read_out(b, deltas)])
    blocks = leading_blocks(units, deltas, n_blocks)
    dirs = random_directions(deltas, blocks, n_random_seed)
    sums = sum(score_directions(a, b, DirectionUnit(p, r, blocks, dirs))
               for p, r in zip(prompts, responses, strict=True))  # fmt: skip
    return summarize(units, readout, (blocks, sums), labels=["a", "b"], categories=[None] * 4,
                     decode=str, n_bootstrap=200, seed=0,
                     causal_request="all" if n_blocks is None else n_blocks)  # fmt: skip


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_planted_direction_is_named_and_causal(sign):
    """Block 1's output gets +/- c u at every position, u's read-out topped by its own token:
    block 1 carries the whole KL(A||B) in both orders, drift is 0 below it and a pure shift
    from it on, its named direction promotes (suppresses for -u) that token first, and B's
    component along it alone gives about all of KL(A||B), random directions about none."""
    a = tiny(0, hidden=128)
    t, u = _self_read_token(a)
    doc = _analysis(a, _planted(a, 1, sign * 3.0 * u))
    rec = {r["layer"]: r for r in doc["layers"]}
    assert rec[1]["fraction"] == pytest.approx(1.0, abs=1e-6)
    assert rec[1]["fraction_reverse"] == pytest.approx(1.0, abs=1e-6)
    assert rec[0]["drift_rel_norm"] == 0.0 and rec[1]["drift_rel_norm"] > 0
    assert rec[1]["shift_share"] == pytest.approx(1.0, abs=1e-5)
    key = "promotes" if sign > 0 else "suppresses"
    assert rec[1][key][0]["id"] == t
    assert rec[1]["direction_fraction"] == pytest.approx(1.0, abs=1e-3)
    assert rec[1]["random_fraction_mean"] < 0.1 and rec[1]["random_fraction_max"] < 0.3
    assert rec[1]["direction_p"] == pytest.approx(1 / 11)
    assert "block 1 carries 1.00" in doc["sentences"][0]


def test_causal_check_of_every_block():
    """``--causal-blocks all``: every block whose mean change is not 0 is checked (block 0,
    below the planted change, is not: it has nothing to put in), and the planted block's own
    direction still reproduces all of KL(A||B)."""
    a = tiny(0, hidden=128)
    _, u = _self_read_token(a)
    doc = _analysis(a, _planted(a, 1, 3.0 * u), n_blocks=None)
    n = len(doc["layers"])
    assert doc["causal_blocks"] == list(range(1, n)) and doc["n_random_directions"] == 10
    checked = [r["layer"] for r in doc["layers"] if r["direction_fraction"] is not None]
    assert checked == list(range(1, n))
    assert doc["layers"][1]["direction_fraction"] == pytest.approx(1.0, abs=1e-3)
    few = _analysis(a, _planted(a, 1, 3.0 * u), n_blocks=3)["layers"][1]
    for key in ("direction_fraction", "random_fraction_mean", "random_fraction_max"):
        assert doc["layers"][1][key] == few[key]  # a block's random draws: its own seed


@pytest.mark.parametrize(
    "text, value",
    [(" 3", 3), ("03", 3), ("0", 0), ("all ", "all"), ("ALL", "all"),
     ("--3", None), ("-1", None), ("\u00b2", None), ("2.0", None), ("some", None)],
)  # fmt: skip
def test_causal_blocks_option_parsing(text, value):
    from divscope.diff.conditions import DiffInputError
    from divscope.diff.layer_options import causal_blocks_problem, parse_causal_blocks

    if value is None:
        with pytest.raises(DiffInputError, match="must be an integer >= 0"):
            parse_causal_blocks(text)
    else:
        assert parse_causal_blocks(text) == value
    assert causal_blocks_problem(np.int64(2)) is None  # a numpy integer from a notebook
    assert causal_blocks_problem(True) and causal_blocks_problem(2.0)


def test_a_dtype_variant_runs_mixed_hybrids():
    """fp32 A against its bf16 copy: the hybrids mix dtypes (each block in its model's dtype),
    the walks end where they must (all of A: 0 would be the next hybrid; all of B: KL(A||B))
    and every part carries some of the rounding."""
    a = tiny(0)
    b = copy.deepcopy(a).to(torch.bfloat16)
    got = score_layers(a, b, PROMPTS[0], RESPONSES[0])
    assert got.kl_total > 0 and np.isfinite(got.forward).all()
    cf, cr, total = contributions([got])
    assert cf.sum() == pytest.approx(total[0]) and cr.sum() == pytest.approx(total[0])
    assert (got.drift[0] > 0).all() and not got.drift[3].any()
