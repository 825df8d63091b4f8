"""Personas and questions: the YAML files, validated (each error names the file, entry and fix)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from divscope.bounded import UnreadableFile, read_yaml
from divscope.sampling.prompts import category_problem


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
        raw = read_yaml(Path(path))
    except UnreadableFile as e:
        raise PersonaDataError(f"{path}: {e}") from e
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
    return _first(out, n, path, "personas")


def _first(entries: list[Any], n: int | None, path: str | Path, what: str) -> list[Any]:
    """The first ``n`` entries (all for None); an error when the file has fewer."""
    if n is None:
        return entries
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= len(entries):
        raise PersonaDataError(
            f"asked for {n!r} {what}, and {path} has {len(entries)}. "
            f"Fix: ask for 1 to {len(entries)} (None: all), or add {what} to the file"
        )
    return entries[:n]


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
        if problem := category_problem(e.get("category")):
            raise PersonaDataError(f"{path}: question {i}: {problem}")
        out.append(Question(str(e.get("id", f"q{i:02d}")), e["text"], e.get("category")))
    return _first(out, n, path, "questions")
