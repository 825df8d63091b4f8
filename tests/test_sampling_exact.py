"""Samples come from exactly the distribution the parameters name: the model's own softmax
(temperature 1, top-p 1), or its tempered top-p nucleus, never truncated by a top-k, a
repetition penalty or another processor from the model's generation config.

Checked by a chi-square goodness-of-fit of thousands of single-token draws against the
distribution computed here in float64, on a random-weight model whose distribution is
nearly flat (most of its mass lies outside its 50 most likely tokens)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from scipy import stats

from divscope.models.generate import generate_hf, generation_config, only_this_config

VOCAB = 300
PROMPT = [3, 17, 42, 8]
N_DRAWS = 6000


@pytest.fixture(scope="module")
def flat_model():
    """A random 2-layer Llama over 300 tokens, nearly flat at the prompt's next position; its
    generation config asks for what a hub model's often does (top-k 50, a repetition
    penalty, a suppressed token), none of which may reach the samples."""
    from tokenizers import Tokenizer, models
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        bos_token_id=0, eos_token_id=VOCAB - 1, pad_token_id=VOCAB - 2,
    )  # fmt: skip
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(5.0)  # logits of spread ~0.8: flat-ish, not uniform
    model.generation_config.top_k = 50
    model.generation_config.repetition_penalty = 1.3
    model.generation_config.suppress_tokens = [5]
    vocab = {f"t{i}": i for i in range(VOCAB)}
    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t1")),
        eos_token=f"t{VOCAB - 1}",
        pad_token=f"t{VOCAB - 2}",
    )
    return model, tok


def next_token_logits(model) -> np.ndarray:  # noqa: ANN001
    """The model's float64 next-token logits after PROMPT (a float64 copy of the model)."""
    m64 = copy.deepcopy(model).double()
    with torch.no_grad():
        return m64(torch.tensor([PROMPT])).logits[0, -1].numpy()


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max())
    return e / e.sum()


def nucleus(p: np.ndarray, top_p: float) -> np.ndarray:
    """``p`` cut to its top-p nucleus (the most likely tokens until their mass reaches top_p:
    a token is kept when the mass strictly more likely than it is below top_p), renormalised."""
    order = np.argsort(-p)
    above = np.cumsum(p[order]) - p[order]  # mass of the tokens ranked before each
    keep = np.zeros(len(p), bool)
    keep[order[above < top_p]] = True
    q = np.where(keep, p, 0.0)
    return q / q.sum()


def draw(model, tok, n: int, **gen) -> np.ndarray:  # noqa: ANN001
    """Counts per token of ``n`` single-token draws after PROMPT, through ``generate_hf``."""
    got = generate_hf(model, tok, [PROMPT] * n, max_new_tokens=1, batch_size=1000, seed=1, **gen)
    assert all(len(r) == 1 for r in got)
    return np.bincount([r[0] for r in got], minlength=VOCAB)


def chi_square_p(counts: np.ndarray, probs: np.ndarray) -> float:
    """Goodness-of-fit p-value of ``counts`` against ``probs`` (tokens of zero probability
    excluded; those must have no draws, checked by the caller), bins whose expected count is
    below 5 pooled into one tail bin."""
    n = counts.sum()
    support = probs > 0
    counts, expected = counts[support], n * probs[support]
    big = expected >= 5
    obs, exp = list(counts[big]), list(expected[big])
    tail_obs, tail_exp = counts[~big].sum(), expected[~big].sum()
    if tail_exp >= 5:
        obs.append(tail_obs)
        exp.append(tail_exp)
    elif tail_exp > 0:  # too little for a bin of its own: into the smallest one
        i = int(np.argmin(exp))
        obs[i] += tail_obs
        exp[i] += tail_exp
    return float(stats.chisquare(obs, exp).pvalue)


def test_the_model_puts_most_of_its_mass_outside_its_top_50(flat_model):
    """The premise that makes the next tests sensitive to a top-k of 50."""
    p = softmax(next_token_logits(flat_model[0]))
    outside = np.sort(p)[:-50].sum()
    assert outside > 0.5, outside


def test_temperature_1_samples_the_full_softmax(flat_model):
    model, tok = flat_model
    p = softmax(next_token_logits(model))
    counts = draw(model, tok, N_DRAWS, temperature=1.0, top_p=1.0)
    top50 = np.argsort(-p)[:50]
    outside_draws = 1 - counts[top50].sum() / N_DRAWS
    outside_mass = 1 - p[top50].sum()
    # truncated to the top 50 (the model's generation config) no draw would land outside
    assert abs(outside_draws - outside_mass) < 4 * np.sqrt(outside_mass / N_DRAWS)
    assert counts[5] > 0  # the token the model's config suppresses is drawn too
    assert chi_square_p(counts, p) > 1e-3


def test_temperature_and_top_p_are_applied_as_named(flat_model):
    model, tok = flat_model
    t, top_p = 0.7, 0.9
    q = nucleus(softmax(next_token_logits(model) / t), top_p)
    counts = draw(model, tok, N_DRAWS, temperature=t, top_p=top_p)
    assert counts[q == 0].sum() == 0  # nothing outside the nucleus
    assert (q > 0).sum() > 60  # a wide nucleus: a top-k of 50 would cut it
    assert chi_square_p(counts, q) > 1e-3
    # and the test can tell: the untempered distribution does not fit these draws
    assert chi_square_p(counts, nucleus(softmax(next_token_logits(model)), top_p)) < 1e-6


@pytest.mark.parametrize("t, top_p", [(1.0, 1.0), (0.7, 0.9)])
def test_the_only_processors_are_temperature_and_top_p(flat_model, t, top_p):
    """generate's processed scores are the raw logits divided by the temperature, the tokens
    outside the top-p nucleus at -inf, nothing else (no top-k, penalty or suppression)."""
    model, tok = flat_model
    cfg = generation_config(t, top_p, max_new_tokens=1, pad=tok.pad_token_id, stops={VOCAB - 1})
    cfg.return_dict_in_generate, cfg.output_scores, cfg.output_logits = True, True, True
    with only_this_config(model, cfg):
        out = model.generate(input_ids=torch.tensor([PROMPT]), generation_config=cfg)
    assert model.generation_config.top_k == 50  # the model's own config is restored after
    raw, scores = out.logits[0][0].double(), out.scores[0][0].double()
    keep = nucleus(softmax(raw.numpy() / t), top_p) > 0
    torch.testing.assert_close(scores[keep], raw[keep] / t, rtol=1e-6, atol=1e-6)
    assert torch.isinf(scores[~keep]).all() and (scores[~keep] < 0).all()
    assert keep.sum() == (VOCAB if top_p == 1 else keep.sum()) and keep.sum() > 50


def test_greedy_is_the_argmax_whatever_the_model_s_config_suppresses(flat_model):
    """temperature 0 is the argmax of the model's logits, even where the model's generation
    config suppresses that very token."""
    model, tok = flat_model
    best = int(np.argmax(next_token_logits(model)))
    saved = model.generation_config.suppress_tokens
    model.generation_config.suppress_tokens = [best]
    try:
        counts = draw(model, tok, 3, temperature=0.0)
    finally:
        model.generation_config.suppress_tokens = saved
    assert counts[best] == 3
