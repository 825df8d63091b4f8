"""Cross-scoring: a model's log-probabilities of another model's response, via ``/completions``.

The prompt is rendered with the scoring model's chat template, the response text appended,
and ``/completions`` asked for echo logprobs with the end-of-sequence token forced so the
server generates nothing. The response's span is what the echo of the full text adds to the
echo of the prompt alone; the seam is checked (the prompt's tokens must be a prefix), and
:func:`seam_check` tests a template before a run trusts it: the model re-scoring one of its
own samples must reproduce the logprobs it sampled with.
"""

from __future__ import annotations

import threading
from typing import Any

from divscope.estimators.topk import coarse_bounds
from divscope.samples.parse import Ctx, scores_from_columns
from divscope.samples.records import TokenVocab
from divscope.sampling.client import APIError, OpenAIClient
from divscope.sampling.config import ModelSpec
from divscope.sampling.responses import f32, topk_columns
from divscope.sampling.templates import ChatTemplate

SEAM_TOLERANCE = 0.05  # nats: first-token logprob, own sample vs re-scored by echo
SEAM_JS_TOLERANCE = 2e-3  # nats: JS lower bound between those two first-position top-k


class SeamError(RuntimeError):
    """The echo of the prompt is not a prefix of the echo of prompt + response."""


class Scorer:
    """Scores text under one model via ``/completions`` echo logprobs."""

    def __init__(
        self, spec: ModelSpec, template: ChatTemplate, client: OpenAIClient, top_k: int
    ) -> None:
        self.spec, self.template, self.client, self.top_k = spec, template, client, top_k
        self._prompt_cache: dict[str, list[str]] = {}
        self._lock = threading.Lock()

    def messages(self, prompt: str) -> list[dict[str, str]]:
        sys_msg = (
            [{"role": "system", "content": self.spec.system_prompt}]
            if self.spec.system_prompt
            else []
        )
        return [*sys_msg, {"role": "user", "content": prompt}]

    def _echo(self, text: str) -> dict[str, Any]:
        payload: dict[str, Any] = {
            "model": self.spec.model,
            "prompt": text,
            "max_tokens": 1,
            "echo": True,
            "logprobs": self.top_k,
            "temperature": 0.0,
        }
        if self.template.eos_token_id is not None:
            payload["logit_bias"] = {str(self.template.eos_token_id): 100}
        body = self.client.post("completions", payload)
        try:
            lp = body["choices"][0]["logprobs"]
            generated = int((body.get("usage") or {}).get("completion_tokens") or 0)
            n = len(lp["tokens"]) - generated
            return {
                "tokens": lp["tokens"][:n],
                "logprobs": lp["token_logprobs"][:n],
                "top": (lp.get("top_logprobs") or [None] * n)[:n],
            }
        except (KeyError, IndexError, TypeError) as e:
            raise APIError(
                f"{self.spec.name}: /completions gave no echo logprobs ({e}); this "
                "server cannot cross-score"
            ) from e

    def score(self, prompt: str, text: str) -> dict[str, Any]:
        """Log-probabilities of ``text`` as this model's answer to ``prompt`` (column-wise)."""
        prompt_text = self.template.render(self.messages(prompt))
        with self._lock:
            head = self._prompt_cache.get(prompt_text)
        if head is None:
            head = self._echo(prompt_text)["tokens"]
            with self._lock:
                self._prompt_cache[prompt_text] = head
        full = self._echo(prompt_text + text)
        n = len(head)
        if full["tokens"][:n] != head:
            raise SeamError(
                f"{self.spec.name}: the response's first token merges with the "
                "end of the prompt; its logprob cannot be separated"
            )
        tokens = full["tokens"][n:]
        top_t, top_l = [], []
        for entry in full["top"][n:]:
            t, v = topk_columns(list((entry or {}).items()), self.top_k)
            top_t.append(t)
            top_l.append(v)
        return {
            "tokens": tokens,
            "logprobs": f32(full["logprobs"][n:]),
            "top_tokens": top_t,
            "top_logprobs": [f32(x) for x in top_l],
        }


def first_position_js(own: dict[str, Any], cross: dict[str, Any]) -> float:
    """Top-k JS lower bound at the first position of two column-wise scorings of one text."""
    vocab = TokenVocab()
    first = [
        scores_from_columns(
            {
                k: v[:1]
                for k, v in x.items()
                if k in ("tokens", "logprobs", "top_tokens", "top_logprobs")
            },
            Ctx("seam check"),
            vocab,
        )
        for x in (own, cross)
    ]
    return float(coarse_bounds(*first)[1][0])


def seam_check(scorer: Scorer, prompt: str, own_sample: dict[str, Any]) -> dict[str, Any]:
    """Re-score one of the model's own samples under the model: the logprobs must come back.

    Args:
        scorer: The model's scorer (its chat template and server).
        prompt: The prompt the sample answers.
        own_sample: The model's response record (:func:`chat_response_record`).

    Returns:
        ``{"ok", ...}`` with the first token's difference, the first position's JS lower
        bound and the drift of later tokens, or ``{"ok": False, "reason"}``.
    """
    if own_sample.get("logprobs") is None:
        return {"ok": False, "reason": "the server returned no logprobs"}
    try:
        cross = scorer.score(prompt, own_sample["text"])
    except (SeamError, APIError) as e:
        return {"ok": False, "reason": str(e)}
    own = own_sample["logprobs"]
    if cross["tokens"] != own["tokens"]:
        return {
            "ok": False,
            "retokenised": True,
            "reason": "re-scoring tokenised the model's own response "
            f"differently ({own['tokens'][:5]} vs {cross['tokens'][:5]})",
        }
    diffs = [
        a - b
        for a, b in zip(own["logprobs"], cross["logprobs"], strict=True)
        if a is not None and b is not None
    ]
    if not diffs:
        return {"ok": False, "reason": "no logprobs to compare"}
    # The first response token's distribution depends only on the rendered prompt, so it
    # must agree; later tokens drift because servers evaluate a prompt in one batch and a
    # generation token by token, and with prefix caching even the first token can move
    # by a few thousandths of a nat (quantised kernels round differently). So the test is
    # on the whole first-position distribution (JS lower bound from the top-k), which a
    # wrong template shifts far more than rounding does.
    js0 = first_position_js(own, cross)
    ok = abs(diffs[0]) <= SEAM_TOLERANCE and js0 <= SEAM_JS_TOLERANCE
    check = {
        "ok": ok,
        "tokens": len(diffs),
        "first_token_diff": diffs[0],
        "first_position_js_lb": js0,
        "drift_mean": sum(diffs) / len(diffs),
        "drift_mean_abs": sum(map(abs, diffs)) / len(diffs),
        "drift_max_abs": max(map(abs, diffs)),
    }
    if not ok:
        check["reason"] = (
            f"re-scoring the model's own response moved the first token's "
            f"logprob by {diffs[0]:.3g} nats (JS >= {js0:.2g}): the chat "
            "template does not render the prompt the way the server does; "
            "set chat_template"
        )
    return check
