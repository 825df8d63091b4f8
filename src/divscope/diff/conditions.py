"""Conditions of a model diff: a model (optionally a LoRA adapter on top, a dtype) and a
system prompt, parsed from a SPEC string and loaded.

SPEC syntax: ``MODEL[,adapter=DIR][,dtype=DTYPE]``, where MODEL is what
:func:`divscope.models.load.load_model` accepts (a packaged short name, a local directory or a
hub name), DIR a PEFT adapter directory (``adapter_config.json`` + weights) merged into the
model's weights on load, and DTYPE ``float32`` (default), ``bfloat16`` or ``float16``.
Examples: ``smollm2-135m-instruct``, ``smollm2-135m-instruct,adapter=data/adapters/pirate``,
``Qwen/Qwen2.5-7B-Instruct,dtype=bfloat16``.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DTYPES = ("float32", "bfloat16", "float16")


class DiffInputError(ValueError):
    """Bad input to a model diff: names what is wrong and the fix (the CLI exits 2)."""


@dataclass(frozen=True)
class Condition:
    """One side of a diff: ``model`` (+ ``adapter``) in ``dtype``, prompted with ``system``."""

    model: str
    adapter: str | None = None
    dtype: str = "float32"
    system: str | None = None

    @property
    def label(self) -> str:
        """A short, readable name: the model, ``+adapter`` and ``@dtype`` when not fp32."""
        name = self.model
        if self.adapter:
            name += f"+{Path(self.adapter).name}"
        if self.dtype != "float32":
            name += f"@{self.dtype}"
        return name

    def identity(self) -> dict[str, Any]:
        """What makes this condition's outputs what they are (for cache keys): the model's
        and the adapter's weights (:func:`divscope.models.load.model_identity`), the dtype and
        the system prompt. Computed once per pipeline run (it stats the weight files)."""
        from divscope.models.load import dir_identity, model_identity

        ident: dict[str, Any] = {**model_identity(self.model), "dtype": self.dtype}
        ident["system"] = self.system
        if self.adapter:
            ident["adapter"] = dir_identity(Path(self.adapter), full=True)
        return ident


def parse_spec(spec: str, system: str | None = None, default_dtype: str = "float32") -> Condition:
    """A :class:`Condition` from ``MODEL[,adapter=DIR][,dtype=DTYPE]`` (see the module doc).

    Raises:
        DiffInputError: An unknown or repeated key, a bad dtype, or an adapter directory that
            is missing.
    """
    parts = [p.strip() for p in spec.split(",")]
    if not parts[0] or "=" in parts[0]:
        raise DiffInputError(
            f"model spec {spec!r} must start with a model name. "
            "Fix: MODEL[,adapter=DIR][,dtype=DTYPE]"
        )
    opts: dict[str, str] = {}
    for p in parts[1:]:
        key, sep, value = p.partition("=")
        if not sep or key not in ("adapter", "dtype") or not value:
            raise DiffInputError(
                f"model spec {spec!r}: cannot read {p!r}. Fix: MODEL[,adapter=DIR][,dtype=DTYPE]"
            )
        if key in opts:
            raise DiffInputError(
                f"model spec {spec!r} gives {key}= twice. Fix: give each of adapter= and dtype= "
                "at most once"
            )
        opts[key] = value
    dtype = opts.get("dtype", default_dtype)
    if dtype not in DTYPES:
        raise DiffInputError(f"model spec {spec!r}: dtype {dtype!r}. Fix: one of {DTYPES}")
    adapter = opts.get("adapter")
    if adapter is not None:
        check_adapter_dir(adapter, spec)
    return Condition(parts[0], adapter, dtype, system)


ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")


def check_adapter_dir(adapter: str, spec: str | None = None) -> None:
    """Refuse an adapter directory PEFT would fail on or misreport: no config, no weights, a
    config that is not a JSON object, no peft_type. ``spec``: the model spec that named it.

    Raises:
        DiffInputError: The first problem, naming the file and the fix.
    """
    folder = Path(adapter)
    path = folder / "adapter_config.json"
    where = f"model spec {spec!r}: " if spec else ""
    fix = "Fix: give the directory that adapter.save_pretrained wrote"
    if not path.is_file():
        raise DiffInputError(
            f"{where}{adapter} is not a PEFT adapter directory (no adapter_config.json). {fix}"
        )
    if not any((folder / w).is_file() for w in ADAPTER_WEIGHTS):
        raise DiffInputError(
            f"{where}{adapter} has no adapter weights (expected "
            f"{' or '.join(ADAPTER_WEIGHTS)} beside adapter_config.json). {fix}"
        )
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise DiffInputError(
            f"{path} is not JSON ({type(e).__name__}: {str(e)[:80]}). {fix}"
        ) from None
    if not isinstance(config, dict):
        raise DiffInputError(
            f"{path} is not a JSON object (it holds a {type(config).__name__}). {fix}"
        )
    if not config.get("peft_type"):
        raise DiffInputError(
            f"{where}{path} names no peft_type (e.g. "
            '"LORA"), so PEFT cannot tell what kind of adapter it is. ' + fix
        )


def load_condition(cond: Condition, device: str = "cpu") -> tuple[Any, Any]:
    """``(model, tokenizer)`` of a condition, the adapter merged into the weights.

    Raises:
        DiffInputError: The model cannot be found, or the adapter does not fit it.
    """
    from divscope.models.load import ModelNotFoundError, load_model

    try:
        model, tok = load_model(cond.model, device=device, dtype=cond.dtype)
    except ModelNotFoundError as e:
        raise DiffInputError(str(e)) from e
    if cond.adapter:
        model = _merge_adapter(model, cond)
    return model, tok


def _merge_adapter(model: Any, cond: Condition) -> Any:
    try:
        from peft import PeftModel
    except ImportError as e:
        raise DiffInputError(
            f"{cond.adapter} is a PEFT adapter, which needs peft. Fix: pip install peft"
        ) from e
    base = json.loads((Path(cond.adapter) / "adapter_config.json").read_text()).get(
        "base_model_name_or_path"
    )
    try:
        with warnings.catch_warnings():  # peft asks transformers for a deprecated property
            warnings.filterwarnings(
                "ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning
            )
            merged = PeftModel.from_pretrained(model, cond.adapter).merge_and_unload()
    except (RuntimeError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()[0][:300]
        raise DiffInputError(
            f"adapter {cond.adapter} does not fit {cond.model} (it was trained on "
            f"{base!r}): {first}. Fix: pair the adapter with its base model"
        ) from e
    return merged.eval()


def load_conditions(conds: dict[str, Condition], device: str = "cpu") -> dict[str, tuple[Any, Any]]:
    """Side -> ``(model, tokenizer)`` of every condition (what a diff worker keeps)."""
    return {s: load_condition(c, device) for s, c in conds.items()}


def condition_meta(cond: Condition) -> tuple[Any, Any]:
    """``(ModelMeta, tokenizer)`` of a condition: no weights (the workers hold the model).

    Raises:
        DiffInputError: The model cannot be found.
    """
    from divscope.models.load import ModelNotFoundError, load_meta

    try:
        return load_meta(cond.model)
    except ModelNotFoundError as e:
        raise DiffInputError(str(e)) from e
