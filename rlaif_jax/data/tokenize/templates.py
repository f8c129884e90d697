"""Chat templates: how a (prompt, response) pair becomes prompt text and response text.

Token-level concerns (BOS, EOS, truncation, masks) live in `encode`; a template only
decides the strings, so the paper's template and a model's own template share one encoder.
"""

from __future__ import annotations

from typing import Any, Protocol

PAPER_TEMPLATE = "Human: {instruction}\n\nAssistant: "


class ChatTemplate(Protocol):
    name: str
    renders_special_tokens: bool

    def prompt_text(self, prompt: str) -> str: ...

    def response_text(self, prompt: str, response: str) -> str: ...


class PaperTemplate:
    """`Human: {instruction}\\n\\nAssistant: ` followed by the raw response (the paper's code)."""

    name = "paper"
    renders_special_tokens = False

    def prompt_text(self, prompt: str) -> str:
        return PAPER_TEMPLATE.format(instruction=prompt)

    def response_text(self, prompt: str, response: str) -> str:
        return response


class ModelTemplate:
    """The tokenizer's own `chat_template`, single turn.

    The response text is whatever the template appends after the generation prompt when
    the assistant turn is added (e.g. the content plus an end-of-turn marker); a template
    whose full rendering does not start with its generation-prompt rendering cannot be
    split that way and is rejected.
    """

    name = "model"
    renders_special_tokens = True  # BOS / EOS / turn markers come from the template text

    def __init__(self, tokenizer: Any):
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("tokenizer has no chat_template; use the paper template")
        self._tok = tokenizer

    def prompt_text(self, prompt: str) -> str:
        return self._tok.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
        )

    def response_text(self, prompt: str, response: str) -> str:
        head = self.prompt_text(prompt)
        full = self._tok.apply_chat_template(
            [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}],
            tokenize=False,
        )
        if not full.startswith(head):
            raise ValueError(
                "chat template is not prefix-stable: the conversation rendering does not start "
                f"with the generation prompt ({head[-40:]!r})"
            )
        return full[len(head) :]


def get_template(name: str, tokenizer: Any = None) -> ChatTemplate:
    if name == "paper":
        return PaperTemplate()
    if name == "model":
        return ModelTemplate(tokenizer)
    raise ValueError(f"unknown template {name!r}; choose 'paper' or 'model'")
