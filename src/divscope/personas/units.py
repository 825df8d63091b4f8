"""The persona pipeline's unit of work: one question's responses under every persona.

:func:`score_question` is the work itself: it takes the model and a plain
:class:`QuestionUnit` (token ids and settings) and returns plain :class:`UnitScores` (numpy
arrays), so it can run in another process that holds its own copy of the model: a worker keeps a
:class:`Scorer` (:func:`load_scorer`) and runs :func:`score_on` and :func:`generate_on` on it.
:class:`UnitCache` keeps each response's scores on disk by content (model, prompt ids,
response ids, parameters): a rerun reads them back and an interrupted run resumes.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from divscope.bounded import ArrayFileError, read_unit_arrays, write_unit_arrays
from divscope.models.generate import GenChunk, generate_chunk
from divscope.models.teacher_force import (
    PromptKV,
    UnitScores,
    output_head,
    prompt_kv,
    teacher_force,
)
from divscope.runmeta import content_hash


@dataclass(frozen=True)
class QuestionUnit:
    """One question's work: every persona's prompt ids and the responses still to score.

    Attributes:
        prompts: Prompt ids per persona (the twin included), in persona order.
        responses: Generator persona index -> its response ids, for the responses to score.
        hidden_generator: The generator whose unit also returns the hidden states at each
            persona's last prompt position (None: no hidden states).
        layers: ``hidden_states`` indices for those hidden states.
    """

    prompts: list[list[int]]
    responses: dict[int, list[int]]
    hidden_generator: int | None
    layers: list[int]


def score_question(
    model: Any,
    unit: QuestionUnit,
    *,
    persona_batch: int | None,
    pad_id: int,
    head: tuple[Any, Any, float | None] | None = None,
) -> dict[int, UnitScores]:
    """Teacher-force each response of ``unit`` under every persona's prompt.

    The question's prompts run once (:func:`prompt_kv`); each response then runs only its own
    tokens against them. Generators are scored in ascending order.

    Returns:
        Generator index -> its :class:`UnitScores` (``(N,)`` JS, KL(P_g||P_o), KL(P_o||P_g)
        in nats, mean over the response's positions).
    """
    if not unit.responses:
        return {}
    kv: PromptKV | None = prompt_kv(
        model, unit.prompts, layers=unit.layers, persona_batch=persona_batch, pad_id=pad_id
    )
    out = {}
    for g in sorted(unit.responses):
        out[g] = teacher_force(
            model,
            unit.prompts,
            unit.responses[g],
            g,
            layers=unit.layers if g == unit.hidden_generator else None,
            persona_batch=persona_batch,
            pad_id=pad_id,
            head=head,
            kv=kv,
        )
    return out


@dataclass
class Scorer:
    """What a worker keeps: the model, its tokenizer, the fp32 output head (built once, on
    first use)."""

    model: Any
    tokenizer: Any
    _head: tuple[Any, Any, float | None] | None = field(default=None, repr=False)

    @property
    def head(self) -> tuple[Any, Any, float | None]:
        if self._head is None:
            self._head = output_head(self.model)
        return self._head

    @property
    def pad_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return pad if pad is not None else 0


def load_scorer(name: str, device: str, dtype: str) -> Scorer:
    """A worker's :class:`Scorer`: the model loaded by name (on a Ray worker, once)."""
    from divscope.models.load import load_model

    return Scorer(*load_model(name, device=device, dtype=dtype))


def score_on(
    scorer: Scorer, unit: QuestionUnit, *, persona_batch: int | None
) -> dict[int, UnitScores]:
    """:func:`score_question` with the scorer's model, head and padding id."""
    return score_question(
        scorer.model, unit, persona_batch=persona_batch, pad_id=scorer.pad_id, head=scorer.head
    )


def generate_on(scorer: Scorer, chunk: GenChunk, **gen: Any) -> list[list[int]]:
    """One generation chunk with the scorer's model (transformers)."""
    return generate_chunk(scorer.model, scorer.tokenizer, chunk, **gen)


class UnitCache:
    """Per-response scores on disk, one ``unit_<hash>.npz`` each, addressed by content."""

    def __init__(self, root: Path, params: dict[str, Any]) -> None:
        self.root = root
        self.params = params  # layers, dtype, twin: part of every key
        root.mkdir(parents=True, exist_ok=True)

    def path(self, prompts: list[list[int]], response: list[int], g: int, hidden: bool) -> Path:
        """The file of generator ``g``'s response to the question with these prompts."""
        key = content_hash(
            {
                "prompts": prompts,
                "response": response,
                "generator": g,
                "hidden": hidden,
                **self.params,
            }
        )
        return self.root / f"unit_{key}.npz"

    @staticmethod
    def read(path: Path, hidden: bool, n_personas: int = -1) -> UnitScores | None:
        """The cached scores, or None when there are none or the file fails its checks.

        A unit that is truncated, edited, renamed or malformed (names, dtypes, shapes, NaN, the
        checksum written with it: :func:`divscope.bounded.read_unit_arrays`) is reported with
        a warning that names the file, and recomputed (the new unit replaces it).
        """
        if not path.exists():
            return None
        n = n_personas
        spec = {"js": ("f", (n,)), "kl_fwd": ("f", (n,)), "kl_rev": ("f", (n,))}
        spec["n_tokens"] = ("iu", ())
        if hidden:
            spec["hidden"] = ("f", (n, -1, -1))
        try:
            z = read_unit_arrays(path, path.stem, spec)
        except ArrayFileError as e:
            warnings.warn(f"{e}; recomputing this unit", stacklevel=2)
            return None
        h = z["hidden"] if hidden else None
        return UnitScores(z["js"], z["kl_fwd"], z["kl_rev"], int(z["n_tokens"]), h)

    @staticmethod
    def write(path: Path, u: UnitScores) -> None:
        """Write ``u`` atomically, with its checksum (:func:`divscope.bounded.write_unit_arrays`)."""
        arrays = {
            "js": u.js,
            "kl_fwd": u.kl_fwd,
            "kl_rev": u.kl_rev,
            "n_tokens": np.array(u.n_tokens),
        }
        if u.hidden is not None:
            arrays["hidden"] = u.hidden
        write_unit_arrays(path, path.stem, arrays)
