"""The prompt dataset of a sampling run: read it (local JSONL/text or a Hugging Face dataset)
and pick the seeded subset."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from divscope.sampling.config import ConfigError, DatasetSpec


@dataclass
class PromptItem:
    """A prompt of the dataset; ``index`` is its position in the full prompt file."""

    index: int
    prompt: str
    id: str | None = None
    category: str | None = None


class PromptsFileError(ValueError):
    """A prompts file that cannot be read: the ``problem`` (naming the file and line) and the
    ``fix``; ``field`` when a line lacks its prompt field. The sampler reports it in its
    config's words (``dataset.path``), ``divscope diff`` in the prompts file's own."""

    def __init__(self, problem: str, fix: str, *, field: bool = False) -> None:
        super().__init__(f"{problem}. Fix: {fix}")
        self.problem, self.fix, self.field = problem, fix, field


_PROMPTS_FIX = 'give a prompts file: .jsonl with one {"prompt": ...} per line, or .txt'


def text_problem(text: str, what: str) -> str | None:
    """Why ``text`` cannot be a prompt: a lone surrogate (from ``\\ud800`` in JSON, or bytes
    that are not UTF-8 in a command-line argument), which no tokenizer or UTF-8 file holds."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        bad = text[e.start]
        origin = "a byte that is not UTF-8" if 0xDC80 <= ord(bad) <= 0xDCFF else "a lone surrogate"
        return (
            f"{what} holds {origin} (\\u{ord(bad):04x} at character {e.start}), which is not "
            "text. Fix: give valid UTF-8 text (a surrogate pair for characters beyond U+FFFF)"
        )
    return None


NO_CATEGORY = "(none)"  # how category tables label the prompts without a category


def category_problem(category: object) -> str | None:
    """Why a prompt's ``category`` is not one: it must be a string (or absent / null), and not
    :data:`NO_CATEGORY`, the label of the prompts without a category in category tables (its
    prompts would merge with those). Any other name, ``"(all)"`` included, is an ordinary
    category: "what changed" keeps its ``overall`` apart from ``by_category``."""
    if category is None or (isinstance(category, str) and category != NO_CATEGORY):
        return None
    if isinstance(category, str):
        return (
            f"category {category!r} is reserved: category tables list the prompts without a "
            "category under it. Fix: rename the category, or leave it out"
        )
    return (
        f"category {category!r} is a {type(category).__name__}, not a string. Fix: write "
        '"category": "name" (or leave it out)'
    )


def _prompts_text(path: Path) -> str:
    """The prompts file as text, or a :class:`PromptsFileError` saying why it is not one."""
    try:
        if path.is_dir():
            raise PromptsFileError(f"{path} is a directory", _PROMPTS_FIX)
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        problem = f"{path} is not UTF-8 text ({e.reason} at byte {e.start})"
        raise PromptsFileError(problem, _PROMPTS_FIX) from e
    except OSError as e:
        raise PromptsFileError(f"{path} cannot be read ({e.strerror})", _PROMPTS_FIX) from e


def read_prompts_file(path: Path, prompt_field: str = "prompt") -> list[PromptItem]:
    """Prompts of a local file: ``.txt`` one per line, else JSONL with a string
    ``prompt_field`` (optional ``id`` and ``category``) per line.

    Raises:
        PromptsFileError: Unreadable, not UTF-8, a line not JSON or without the field, empty.
    """
    text = _prompts_text(path)
    if path.suffix == ".txt":
        lines = [ln.strip() for ln in text.splitlines()]
        items = [PromptItem(i, ln) for i, ln in enumerate(x for x in lines if x)]
        if not items:
            raise PromptsFileError(f"{path} holds no prompts", "one per line")
        return items
    items = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except (ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError
            raise PromptsFileError(
                f"{path} line {n} is not JSON ({e})", "fix the prompts file"
            ) from e
        if not isinstance(row, dict) or not isinstance(row.get(prompt_field), str):
            raise PromptsFileError(
                f"{path} line {n} has no string field {prompt_field!r}",
                f'give every line a string "{prompt_field}": {{"{prompt_field}": "..."}}',
                field=True,
            )
        problem = text_problem(row[prompt_field], "its prompt") or category_problem(
            row.get("category")
        )
        if problem:
            what, _, fix = problem.partition(". Fix: ")
            raise PromptsFileError(f"{path} line {n}: {what}", fix)
        items.append(PromptItem(len(items), row[prompt_field], row.get("id"), row.get("category")))
    if not items:
        raise PromptsFileError(f"{path} holds no prompts", "one JSON object per line")
    return items


def load_prompts(ds: DatasetSpec, config_path: str | Path = "<config>") -> list[PromptItem]:
    """Read the prompt dataset (local .jsonl/.txt, or a Hugging Face dataset)."""
    if ds.source == "huggingface":
        try:
            import datasets  # noqa: PLC0415 - optional, needs a network
        except ImportError as e:
            raise ConfigError(
                config_path,
                "dataset.source",
                "huggingface needs `datasets`",
                "pip install datasets, or use source: local",
            ) from e
        rows = datasets.load_dataset(ds.name, split=ds.split)
        return [
            PromptItem(i, str(r[ds.prompt_field]), category=r.get("category"))
            for i, r in enumerate(rows)
        ]
    path = Path(ds.path)
    if not path.exists() and config_path != "<config>":
        path = Path(config_path).parent / ds.path
    if not path.exists():
        raise ConfigError(
            config_path,
            "dataset.path",
            f"{ds.path} does not exist",
            "give a prompts file relative to the working directory",
        )
    try:
        return read_prompts_file(path, ds.prompt_field)
    except PromptsFileError as e:  # in the config's words
        if e.field:
            fix = "fix the file or set dataset.prompt_field"
            raise ConfigError(config_path, "dataset.prompt_field", e.problem, fix) from e
        raise ConfigError(config_path, "dataset.path", e.problem, e.fix) from e


def select_prompts(items: list[PromptItem], num: int | None, seed: int) -> list[PromptItem]:
    """A seeded random subset of ``num`` prompts, kept in file order (all when None)."""
    if num is None or num >= len(items):
        return list(items)
    chosen = sorted(random.Random(seed).sample(range(len(items)), num))
    return [items[i] for i in chosen]
