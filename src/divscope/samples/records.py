"""The in-memory shape of sample files: token scores, responses, records, sample sets.

Three formats are read, all into the same in-memory shape (:class:`SampleSet`):

* the legacy pickle: a list of ``{prompt, model, responses}`` where each response is an
  OpenAI ``chat.completion`` dict (read with :func:`divscope.samples.safe_pickle.safe_load_pickle`);
* OpenRouter JSON: a JSON list of the same records (tokens may carry ``bytes``);
* divscope JSONL: one record per prompt, responses stored column-wise (see :data:`FORMAT`),
  optionally with tokenizer ids, byte offsets and cross-scores under other models.

Per response, positions are held as arrays: ``ids (T,)`` interned token ids, ``logprobs (T,)``,
``top_ids (T, K)`` padded with -1 and ``top_logprobs (T, K)`` padded with -inf. Token strings
are interned in a :class:`TokenVocab` shared by the files that are compared, so metrics compare
integers instead of walking dicts.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

FORMAT = "divscope.samples/1"
# API logprobs are rounded floats; a log-probability a little above 0 is rounding, 0.5 is not.
_LOGPROB_TOLERANCE = 1e-3


class TokenVocab:
    """Interns token strings as integers; share one between the files you compare.

    Ids are unique but not contiguous (interning runs at C speed through ``dict.setdefault``
    with a counter); ``strings[id]`` maps an id back to its token.
    """

    def __init__(self) -> None:
        self._index: dict[str, int] = {}
        self._counter = itertools.count()
        self._strings: dict[int, str] = {}

    def __len__(self) -> int:
        return len(self._index)

    def ids(self, tokens: list[str]) -> np.ndarray:
        """Return the ids of ``tokens`` as an int64 array of shape ``(len(tokens),)``."""
        ids = list(map(self._index.setdefault, tokens, self._counter))
        return np.array(ids, dtype=np.int64).reshape(len(tokens))

    @property
    def strings(self) -> dict[int, str]:
        """Id -> token string."""
        if len(self._strings) != len(self._index):
            self._strings = {v: k for k, v in self._index.items()}
        return self._strings


@dataclass
class TokenScores:
    """Per-position log-probabilities of a token sequence under one model.

    Attributes:
        tokens: Token strings, length T.
        ids: Interned token ids, shape ``(T,)``.
        logprobs: Log-probability of each token, shape ``(T,)``; NaN where the server gave none.
        top_ids: Interned ids of the top-k alternatives, shape ``(T, K)``, -1 padded.
        top_logprobs: Their log-probabilities, shape ``(T, K)``, -inf padded; float64, or
            float32 when read from a packed file that stored them so (exact values; widen
            before arithmetic).
        token_ids: Tokenizer ids where the server gave them, else None.
        byte_offsets: Byte offset of each token in the text where known, else None.
    """

    tokens: list[str]
    ids: np.ndarray
    logprobs: np.ndarray
    top_ids: np.ndarray
    top_logprobs: np.ndarray
    token_ids: np.ndarray | None = None
    byte_offsets: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def n_missing(self) -> int:
        """Positions without a log-probability."""
        return int(np.isnan(self.logprobs).sum())


@dataclass
class CrossScore:
    """Another model's log-probabilities of a response.

    ``aligned`` means the scores are for this response's own tokens, position by position
    (same tokenizer); otherwise ``scores`` holds the other model's own tokenisation of the
    same text and only the sequence total is comparable (per byte).
    """

    aligned: bool
    scores: TokenScores


@dataclass
class Response:
    """One sampled response.

    Attributes:
        text: The response text.
        finish_reason: As reported by the server.
        scores: The generating model's per-token log-probabilities, or None when missing.
        cross: Cross-scores by model name.
        excluded_reason: Why the response cannot be scored (None when it can).
    """

    text: str
    finish_reason: str | None
    scores: TokenScores | None
    cross: dict[str, CrossScore] = field(default_factory=dict)
    excluded_reason: str | None = None

    @property
    def n_bytes(self) -> int:
        """UTF-8 length of the text."""
        return len(self.text.encode("utf-8"))


@dataclass
class PromptSamples:
    """All responses of one model to one prompt."""

    index: int
    prompt: str
    model: str
    responses: list[Response]
    category: str | None = None

    @property
    def usable(self) -> list[Response]:
        """Responses that carry log-probabilities."""
        return [r for r in self.responses if r.excluded_reason is None]


@dataclass
class SampleSet:
    """A whole sample file: one model, one record per prompt."""

    path: Path
    model: str
    records: list[PromptSamples]
    vocab: TokenVocab
    source_format: str

    @property
    def n_excluded(self) -> int:
        """Responses excluded for missing log-probabilities, over all records."""
        return sum(len(r.responses) - len(r.usable) for r in self.records)

    def record(self, index: int) -> PromptSamples:
        """The record of prompt ``index`` (its index in the prompt file, not its position in
        :attr:`records`: a run of a subset of prompts has gaps).

        Raises:
            KeyError: No record has that index.
        """
        for r in self.records:
            if r.index == index:
                return r
        raise KeyError(f"{self.path} holds no record of prompt {index}")

    def has_cross_scores(self, other_model: str) -> bool:
        """Whether every usable response carries a cross-score under ``other_model``."""
        usable = [resp for rec in self.records for resp in rec.usable]
        return bool(usable) and all(other_model in resp.cross for resp in usable)


def exclusion_reason(scores: TokenScores) -> str | None:
    """Why a response with these scores cannot be scored, or None when it can."""
    if len(scores) == 0:
        return "empty response (no tokens)"
    if scores.n_missing:
        return f"{scores.n_missing} of {len(scores)} tokens have no logprob"
    return None
