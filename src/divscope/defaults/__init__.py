"""The inputs that ship with divscope, so the CLI works from any directory: 12 personas
(``personas.yaml``), 20 questions (``questions.yaml``) and 72 categorised prompts
(``prompts.jsonl``). The repository's ``data/personas/core.yaml``,
``data/questions/eval20.yaml`` and ``data/prompts/prompts.jsonl`` are links to these files."""

from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).resolve().parent
PERSONAS = HERE / "personas.yaml"
QUESTIONS = HERE / "questions.yaml"
PROMPTS = HERE / "prompts.jsonl"
