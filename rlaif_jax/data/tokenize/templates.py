"""Chat templates: how a (prompt, response) pair becomes prompt text and response text.

Token-level concerns (BOS, EOS, truncation, masks) live in `encode`; a template only
decides the strings, so the paper's template and a model's own template share one encoder.
`encode_conversation` tokenizes a whole multi-turn conversation with the model's template and
marks its assistant tokens (docs/models.md "Chat templates").
"""

from __future__ import annotations

from typing import Any, Protocol, Sequence

import numpy as np

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

    `thinking` is passed to the template as `enable_thinking` (templates without it ignore
    it): off by default, so Qwen3's prompt ends with an empty `<think>\n\n</think>\n\n`
    block and SFT / DPO responses are plain answers; "model_thinking" turns it on.
    """

    renders_special_tokens = True  # BOS / EOS / turn markers come from the template text

    def __init__(self, tokenizer: Any, thinking: bool = False):
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("tokenizer has no chat_template; use the paper template")
        self._tok = tokenizer
        self.thinking = thinking
        self.name = "model_thinking" if thinking else "model"

    def render(self, messages: Sequence[dict], add_generation_prompt: bool = False) -> str:
        return self._tok.apply_chat_template(
            list(messages), add_generation_prompt=add_generation_prompt, tokenize=False, enable_thinking=self.thinking
        )

    def prompt_text(self, prompt: str) -> str:
        return self.render([{"role": "user", "content": prompt}], add_generation_prompt=True)

    def response_text(self, prompt: str, response: str) -> str:
        head = self.prompt_text(prompt)
        full = self.render([{"role": "user", "content": prompt}, {"role": "assistant", "content": response}])
        if not full.startswith(head):
            raise ValueError(
                "chat template is not prefix-stable: the conversation rendering does not start "
                f"with the generation prompt ({head[-40:]!r})"
            )
        return full[len(head) :]


TEMPLATE_NAMES = ("paper", "model", "model_thinking")


def get_template(name: str, tokenizer: Any = None) -> ChatTemplate:
    if name == "paper":
        return PaperTemplate()
    if name in ("model", "model_thinking"):
        return ModelTemplate(tokenizer, thinking=name == "model_thinking")
    raise ValueError(f"unknown template {name!r}; choose one of {', '.join(TEMPLATE_NAMES)}")


_PROBE = "\u2063probe\u2063"  # text no template rewrites and no conversation holds


def turn_end(template: ModelTemplate) -> str:
    """What the template writes after an assistant message's content (Llama 3 "<|eot_id|>",
    ChatML "<|im_end|>\\n", Gemma "<end_of_turn>\\n"): the end of an assistant span, which the
    loss covers so the model learns to stop."""
    full = template.render([{"role": "user", "content": "x"}, {"role": "assistant", "content": _PROBE}])
    at = full.rfind(_PROBE)
    if at < 0:
        raise ValueError("chat template drops the assistant content: cannot mark assistant tokens")
    return full[at + len(_PROBE) :]


def encode_conversation(tokenizer: Any, messages: Sequence[dict], thinking: bool = False) -> tuple:
    """A multi-turn conversation as the model's chat template renders it, tokenized.

    Args:
      tokenizer: a fast HF tokenizer with a chat_template.
      messages: [{"role": "system" | "user" | "assistant", "content": str}, ...].
      thinking: `enable_thinking` for the template (ModelTemplate).
    Returns:
      (ids, assistant_mask): int32 arrays; ids equal
      tokenizer.apply_chat_template(messages, tokenize=True) and the mask is 1 exactly on the
      tokens of each assistant message's content and its turn end (`turn_end`), 0 on role
      headers, other roles and the template's own text (e.g. Qwen3's empty think block).
    Raises:
      ValueError: a message the rendering does not hold verbatim (after trimming), or a token
      that straddles an assistant span's edge.
    """
    tmpl = ModelTemplate(tokenizer, thinking)
    text = tmpl.render(messages)
    end = turn_end(tmpl)
    spans, cursor = [], 0
    for i, m in enumerate(messages):
        content = m["content"]
        at = text.find(content, cursor)
        if at < 0:
            content = content.strip()
            at = text.find(content, cursor)
        if at < 0:
            raise ValueError(f"message {i} ({m['role']}): its content is not in the template's rendering")
        cursor = at + len(content)
        if m["role"] == "assistant":
            if not text.startswith(end, cursor):
                raise ValueError(f"message {i}: the template does not end the assistant turn with {end!r}")
            cursor += len(end)
            spans.append((at, cursor))
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = np.asarray(enc["input_ids"], np.int32)
    mask = np.zeros(len(ids), np.int32)
    for t, (a, b) in enumerate(enc["offset_mapping"]):
        for s, e in spans:
            if s <= a < e:
                if b > e:
                    raise ValueError(f"token {t} ({text[a:b]!r}) straddles the end of an assistant span")
                mask[t] = 1
            elif a < s < b:
                raise ValueError(f"token {t} ({text[a:b]!r}) straddles the start of an assistant span")
    return ids, mask
