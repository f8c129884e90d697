"""Token ids for prompts, SFT examples and preference pairs, with the paper's truncation.

Layout of every encoded sequence: [BOS] + prompt tokens + response tokens (+ EOS).
  - exactly one BOS (when the tokenizer has one), even if the template renders one itself;
  - EOS ends the response unless the template's response already contains it;
  - the response part is what the loss mask covers (see `pipeline.batches`).
Truncation follows the paper's code (DPO's tokenize_batch_element): if prompt + (longest)
response exceeds max_length, the prompt is cut to max_prompt_length (keep_end keeps the
end, which holds "Assistant: "; BOS is always kept), then, if still too long, each
response is cut to max_length - max_prompt_length (which can cut off EOS, as there).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence

import numpy as np

from rlaif_jax.data.tokenize.templates import ChatTemplate, get_template

TRUNCATION_MODES = ("keep_end", "keep_start")


@dataclasses.dataclass(frozen=True)
class Encoded:
    """One tokenized (prompt, response): `prompt` includes BOS, `response` includes EOS."""

    prompt: np.ndarray
    response: np.ndarray

    @property
    def length(self) -> int:
        return len(self.prompt) + len(self.response)


class Encoder:
    """Tokenizes with a template and truncation policy; batch methods use the fast tokenizer
    on whole lists (Rust, parallel), which is what makes corpus-scale encoding quick."""

    def __init__(
        self,
        tokenizer: Any,
        template: str | ChatTemplate = "paper",
        max_length: int = 512,
        max_prompt_length: int = 256,
        truncation_mode: str = "keep_end",
        add_bos: Optional[bool] = None,
    ):
        if truncation_mode not in TRUNCATION_MODES:
            raise ValueError(f"truncation_mode must be one of {TRUNCATION_MODES}, got {truncation_mode!r}")
        if not 0 < max_prompt_length < max_length:
            raise ValueError(f"need 0 < max_prompt_length ({max_prompt_length}) < max_length ({max_length})")
        self.tokenizer = tokenizer
        self.template = get_template(template, tokenizer) if isinstance(template, str) else template
        self.max_length = max_length
        self.max_prompt_length = max_prompt_length
        self.truncation_mode = truncation_mode
        self.bos_id = tokenizer.bos_token_id if add_bos in (None, True) else None
        if add_bos and self.bos_id is None:
            raise ValueError("add_bos=True but the tokenizer has no BOS token")
        self.eos_id = tokenizer.eos_token_id
        if self.eos_id is None:
            raise ValueError("tokenizer has no EOS token; responses must end with one")

    # -- raw ids, untruncated

    def _ids(self, texts: Sequence[str]) -> list[list[int]]:
        if not texts:
            return []
        # A template that writes no special tokens itself gets them split as plain text, so
        # a "<s>" or "</s>" typed by a user can never become a second BOS or an early EOS.
        split = not getattr(self.template, "renders_special_tokens", False)
        return self.tokenizer(list(texts), add_special_tokens=False, split_special_tokens=split)["input_ids"]

    def prompt_ids(self, prompts: Sequence[str]) -> list[list[int]]:
        out = []
        for ids in self._ids([self.template.prompt_text(p) for p in prompts]):
            if self.bos_id is not None:
                start = 0
                while start < len(ids) and ids[start] == self.bos_id:
                    start += 1
                ids = [self.bos_id] + ids[start:]
            out.append(ids)
        return out

    def response_ids(self, prompts: Sequence[str], responses: Sequence[str]) -> list[list[int]]:
        texts = [self.template.response_text(p, r) for p, r in zip(prompts, responses)]
        return [ids if self.eos_id in ids else ids + [self.eos_id] for ids in self._ids(texts)]

    # -- truncation

    def _truncate_prompt(self, ids: list[int]) -> list[int]:
        n = self.max_prompt_length
        if self.truncation_mode == "keep_start":
            return ids[:n]
        has_bos = self.bos_id is not None and ids[:1] == [self.bos_id]
        return ids[:1] + ids[len(ids) - (n - 1) :] if has_bos else ids[len(ids) - n :]

    def _truncate(self, prompt: list[int], responses: list[list[int]]) -> tuple[list[int], list[list[int]]]:
        longest = max(len(r) for r in responses)
        if len(prompt) + longest > self.max_length and len(prompt) > self.max_prompt_length:
            prompt = self._truncate_prompt(prompt)
        if len(prompt) + longest > self.max_length:
            budget = self.max_length - self.max_prompt_length
            responses = [r[:budget] for r in responses]
        return prompt, responses

    # -- public encoders

    def encode_prompts(self, prompts: Sequence[str]) -> list[np.ndarray]:
        """Prompts for sampling: BOS + template, cut to max_prompt_length by the policy."""
        return [
            np.asarray(self._truncate_prompt(p) if len(p) > self.max_prompt_length else p, np.int32)
            for p in self.prompt_ids(prompts)
        ]

    def encode_sft(self, prompts: Sequence[str], responses: Sequence[str]) -> list[Encoded]:
        out = []
        for p, r in zip(self.prompt_ids(prompts), self.response_ids(prompts, responses)):
            p, (r,) = self._truncate(p, [r])
            out.append(Encoded(np.asarray(p, np.int32), np.asarray(r, np.int32)))
        return out

    def encode_pairs(
        self, prompts: Sequence[str], chosen: Sequence[str], rejected: Sequence[str]
    ) -> list[tuple[Encoded, Encoded]]:
        """Both responses share one truncated prompt, decided by the longer response."""
        out = []
        ps = self.prompt_ids(prompts)
        cs = self.response_ids(prompts, chosen)
        rs = self.response_ids(prompts, rejected)
        for p, c, r in zip(ps, cs, rs):
            p, (c, r) = self._truncate(p, [c, r])
            p = np.asarray(p, np.int32)
            out.append((Encoded(p, np.asarray(c, np.int32)), Encoded(p, np.asarray(r, np.int32))))
        return out
