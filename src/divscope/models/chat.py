"""Chat prompts for local models: render (system, user) as token ids, and check the seam.

Teacher forcing reuses the generator's token ids, so the prompt ids must be exactly the start of
the rendered conversation: :meth:`PromptRenderer.check_seam` renders prompt + response and
compares (DESIGN.md, "Divergence semantics").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


class TemplateSeamError(RuntimeError):
    """Rendering the full conversation does not give prompt ids + response ids."""


@dataclass
class PromptRenderer:
    """Renders (system prompt, user turn) prompts as token ids with a tokenizer's chat template.

    Templates without a system role (e.g. Gemma) get the system prompt merged into the user
    turn (system prompt, blank line, user turn); ``warnings`` records that for the metadata.
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
        self, system: str | None, user: str, response: str | None = None
    ) -> list[dict[str, str]]:
        """The conversation: system prompt (or none), user turn, optionally the response."""
        if system is None:
            msgs = [{"role": "user", "content": user}]
        elif self.system_role:
            msgs = [{"role": "system", "content": system}, {"role": "user", "content": user}]
        else:
            msgs = [{"role": "user", "content": f"{system}\n\n{user}"}]
        if response is not None:
            msgs.append({"role": "assistant", "content": response})
        return msgs

    def _ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def prompt_ids(self, system: str | None, user: str) -> list[int]:
        """Prompt token ids, generation prompt included (BOS only if the template writes it)."""
        text = self.tokenizer.apply_chat_template(
            self.messages(system, user), tokenize=False, add_generation_prompt=True
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
        system: str | None,
        user: str,
        prompt_ids: list[int],
        response_ids: list[int],
        stop_ids: set[int],
    ) -> dict[str, Any]:
        """Rendering the whole conversation must give ``prompt_ids + response_ids`` (up to the
        end-of-turn tokens). Raises :class:`TemplateSeamError` otherwise.

        A sampled response need not be in the tokenizer's canonical tokenization (``UT`` +
        ``SB`` where the text re-tokenises as ``UTS`` + ``B``); that says nothing about the
        template, so it passes (``retokenised: true``) when the rendering still starts with
        the prompt ids and then the response's exact text.
        """
        body = [t for t in response_ids if t not in stop_ids]
        text = self.tokenizer.decode(body, skip_special_tokens=False)
        full = self.tokenizer.apply_chat_template(self.messages(system, user, text), tokenize=False)
        full_ids = self._ids(full)
        expected = prompt_ids + body
        n = len(prompt_ids)
        retokenised = (
            full_ids[: len(expected)] != expected
            and full_ids[:n] == prompt_ids
            and self.tokenizer.decode(full_ids[n:], skip_special_tokens=False).startswith(text)
        )
        if full_ids[: len(expected)] != expected and not retokenised:
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
            "retokenised": retokenised,
        }
