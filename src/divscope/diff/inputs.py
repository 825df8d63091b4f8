"""A model diff's inputs checked before any model loads (parameters, prompts, system prompts,
adapter configs, weight files, the vLLM backend) and, once the tokenizers are read, the prompts'
lengths against each model's context and the two output heads. Every problem is one
:class:`~divscope.diff.conditions.DiffInputError` naming what is wrong and the fix."""

from __future__ import annotations

from typing import Any

from divscope.diff.conditions import Condition, DiffInputError, check_adapter_dir
from divscope.models.checks import (
    context_limit,
    context_problem,
    generation_problem,
    prompt_name,
    weights_problem,
)
from divscope.sampling.prompts import PromptItem, text_problem

BACKENDS = ("hf", "vllm")


def check_inputs(
    conditions: dict[str, Condition],
    prompts: list[PromptItem],
    params: dict[str, Any],
    backend: str,
) -> None:
    """Everything about a diff that can be checked without loading a model.

    ``params``: ``samples``, ``max_new_tokens``, ``temperature``, ``top_p``, ``seed``.

    Raises:
        DiffInputError: The first problem found.
    """
    n_s = params["samples"]
    if isinstance(n_s, bool) or not isinstance(n_s, int) or n_s < 1:
        raise DiffInputError(f"samples {n_s!r} must be a positive integer")
    # an unknown backend is not "vllm": generation_problem's sampling checks come first
    if problem := generation_problem(params, len(prompts) * n_s, backend):
        raise DiffInputError(problem)
    if backend not in BACKENDS:
        raise DiffInputError(f"backend {backend!r} is not one of {', '.join(BACKENDS)}")
    for p in prompts:
        if problem := text_problem(p.prompt, f"prompt {p.index}"):
            raise DiffInputError(problem)
    for side, cond in conditions.items():
        if cond.system is not None and (
            problem := text_problem(cond.system, f"the system prompt of {side.upper()}")
        ):
            raise DiffInputError(problem)
        check_condition_files(cond)


def check_condition_files(cond: Condition) -> None:
    """A condition's adapter config (a JSON object) and the ``.safetensors`` files of a local
    model or adapter directory (complete, by their headers), before anything loads them.

    Raises:
        DiffInputError: A file that would fail to load, named, with the fix.
    """
    if cond.adapter:
        check_adapter_dir(cond.adapter)
    for d in (cond.model, cond.adapter):
        if d and (problem := weights_problem(d)):
            raise DiffInputError(problem)


def check_loaded(
    conditions: dict[str, Condition],
    models: dict[str, Any],
    prompts: list[PromptItem],
    prompt_ids: dict[str, list[list[int]]],
    max_new_tokens: int | None,
    same_tokenizer: bool,
) -> None:
    """What needs the tokenizers and configs: every rendered prompt plus ``max_new_tokens``
    fits each model's context, and two models with one tokenizer have output heads of one
    size (a padded vocabulary would compare different distributions position by position).

    Raises:
        DiffInputError: The first problem found.
    """
    if max_new_tokens is not None:
        names = [prompt_name(p.index, p.prompt) for p in prompts]
        for s, cond in conditions.items():
            named = list(zip(names, prompt_ids[s], strict=True))
            limit = context_limit(models[s])
            if problem := context_problem(named, max_new_tokens, limit, cond.label):
                raise DiffInputError(problem)
    if same_tokenizer:
        rows = {s: output_rows(m) for s, m in models.items()}
        if None not in rows.values() and len(set(rows.values())) > 1:
            a, b = (conditions[s].label for s in ("a", "b"))
            raise DiffInputError(
                f"{a}'s output head has {rows['a']} rows and {b}'s {rows['b']}: one tokenizer, "
                "padded to different vocabulary sizes, so their next-token distributions are "
                "not over one set of ids. Fix: diff models whose heads have the same size"
            )


def output_rows(model: Any) -> int | None:
    """Rows of a model's output head (its vocabulary size); from the config when only the
    model's :class:`~divscope.models.load.ModelMeta` is here."""
    head = getattr(model, "get_output_embeddings", None)
    weight = getattr(head() if callable(head) else None, "weight", None)
    if weight is not None:
        return int(weight.shape[0])
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    rows = getattr(config, "vocab_size", None)
    return rows if isinstance(rows, int) else None
