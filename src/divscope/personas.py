"""Personas, questions and their prompts: rendering with the chat template, and the seam check."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


@dataclass(frozen=True)
class Persona:
    name: str
    prompt: str


@dataclass(frozen=True)
class Question:
    id: str
    text: str
    category: str | None = None


class PersonaDataError(ValueError):
    """A personas or questions file cannot be used; names the file, the entry and the fix."""


def _entries(path: Path, key: str) -> list[Any]:
    try:
        raw = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise PersonaDataError(f"{path}: no such file. Fix: check the path") from e
    except yaml.YAMLError as e:
        raise PersonaDataError(f"{path}: not valid YAML ({e}). Fix: fix the syntax") from e
    entries = raw.get(key) if isinstance(raw, dict) else raw
    if not isinstance(entries, list) or not entries:
        raise PersonaDataError(
            f"{path}: expected a non-empty list under `{key}:`. Fix: see data/{key}/"
        )
    return entries


def load_personas(path: str | Path, n: int | None = None) -> list[Persona]:
    """The first ``n`` personas of a YAML file (``personas: [{name, prompt}]``)."""
    out = []
    for i, e in enumerate(_entries(Path(path), "personas")):
        if (
            not isinstance(e, dict)
            or not isinstance(e.get("name"), str)
            or not isinstance(e.get("prompt"), str)
        ):
            raise PersonaDataError(
                f"{path}: persona {i} needs string `name` and `prompt`. "
                "Fix: write {name: ..., prompt: ...}"
            )
        out.append(Persona(e["name"], e["prompt"]))
    names = [p.name for p in out]
    if len(set(names)) != len(names):
        dup = next(x for x in names if names.count(x) > 1)
        raise PersonaDataError(f"{path}: persona name {dup!r} appears twice. Fix: rename one")
    return out[:n] if n else out


def load_questions(path: str | Path, n: int | None = None) -> list[Question]:
    """The first ``n`` questions of a YAML file (``questions: [{id, text, category}]``)."""
    out = []
    for i, e in enumerate(_entries(Path(path), "questions")):
        if isinstance(e, str):
            e = {"id": f"q{i:02d}", "text": e}
        if not isinstance(e, dict) or not isinstance(e.get("text"), str):
            raise PersonaDataError(
                f"{path}: question {i} needs a string `text`. "
                "Fix: write {id: ..., text: ..., category: ...}"
            )
        out.append(Question(str(e.get("id", f"q{i:02d}")), e["text"], e.get("category")))
    return out[:n] if n else out


class TemplateSeamError(RuntimeError):
    """Rendering the full conversation does not give prompt ids + response ids."""


@dataclass
class PromptRenderer:
    """Renders (persona, question) prompts as token ids with a tokenizer's chat template.

    Templates without a system role (e.g. Gemma) get the persona merged into the user turn;
    ``warnings`` records that for the metadata.
    """

    tokenizer: Any
    system_role: bool = True
    warnings: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        probe = [{"role": "system", "content": "SYSTEM-PROBE"}, {"role": "user", "content": "u"}]
        try:
            text = self.tokenizer.apply_chat_template(
                probe, tokenize=False, add_generation_prompt=True
            )
            self.system_role = "SYSTEM-PROBE" in text
        except Exception:  # noqa: BLE001 - templates raise whatever they like
            self.system_role = False
        if not self.system_role:
            self.warnings.append(
                "the chat template has no system role: each persona's system "
                "prompt is merged into the user turn (persona, blank line, "
                "question)"
            )

    def messages(
        self, persona: Persona, question: Question, response: str | None = None
    ) -> list[dict[str, str]]:
        if self.system_role:
            msgs = [
                {"role": "system", "content": persona.prompt},
                {"role": "user", "content": question.text},
            ]
        else:
            msgs = [{"role": "user", "content": f"{persona.prompt}\n\n{question.text}"}]
        if response is not None:
            msgs.append({"role": "assistant", "content": response})
        return msgs

    def _ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def prompt_ids(self, persona: Persona, question: Question) -> list[int]:
        """Prompt token ids, generation prompt included (BOS only if the template writes it)."""
        text = self.tokenizer.apply_chat_template(
            self.messages(persona, question), tokenize=False, add_generation_prompt=True
        )
        return self._ids(text)

    def bos_count(self, ids: list[int]) -> int:
        bos = self.tokenizer.bos_token_id
        return sum(1 for i in ids if i == bos) if bos is not None else 0

    def leading_bos(self, ids: list[int]) -> int:
        """BOS tokens at the very start (2 or more means BOS was added twice)."""
        bos = self.tokenizer.bos_token_id
        k = 0
        while bos is not None and k < len(ids) and ids[k] == bos:
            k += 1
        return k

    def check_seam(
        self,
        persona: Persona,
        question: Question,
        prompt_ids: list[int],
        response_ids: list[int],
        stop_ids: set[int],
    ) -> dict[str, Any]:
        """Rendering the whole conversation must give ``prompt_ids + response_ids`` (up to the
        end-of-turn tokens). Raises :class:`TemplateSeamError` otherwise."""
        body = [t for t in response_ids if t not in stop_ids]
        text = self.tokenizer.decode(body, skip_special_tokens=False)
        full = self.tokenizer.apply_chat_template(
            self.messages(persona, question, text), tokenize=False
        )
        full_ids = self._ids(full)
        expected = prompt_ids + body
        if full_ids[: len(expected)] != expected:
            k = next(
                (i for i, (a, b) in enumerate(zip(full_ids, expected, strict=False)) if a != b),
                min(len(full_ids), len(expected)),
            )
            show = self.tokenizer.convert_ids_to_tokens
            raise TemplateSeamError(
                f"the chat template breaks the prompt/response seam at token {k} "
                f"(prompt has {len(prompt_ids)} tokens): rendered "
                f"{show(full_ids[max(0, k - 2) : k + 3])} but prompt + response ids give "
                f"{show(expected[max(0, k - 2) : k + 3])}. Fix: use a template whose generation "
                "prompt is exactly the start of the assistant turn (no stripping or "
                "reformatting of the assistant content)"
            )
        return {
            "ok": True,
            "prompt_tokens": len(prompt_ids),
            "response_tokens": len(body),
            "trailing_tokens": full_ids[len(expected) :][:8],
        }
