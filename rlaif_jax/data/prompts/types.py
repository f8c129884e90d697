"""What the readers return: prompts (optionally with a reference completion) and stats."""

from __future__ import annotations

import collections
import dataclasses
from typing import Any, Optional

from rlaif_jax.data.ids import prompt_id
from rlaif_jax.data.records.schemas import normalize_finish_reason
from rlaif_jax.errors import UserError


class InputError(UserError):
    """A malformed input record; the message names the file, record index and field."""


@dataclasses.dataclass(frozen=True)
class PromptExample:
    """One single-turn prompt, with the completion its source carries, if any.

    `index` is the record's position in the source file, so splits and errors can point
    back at the input.
    """

    prompt: str
    source: str
    index: int
    completion: Optional[str] = None
    completion_model: Optional[str] = None
    finish_reason: Optional[str] = None

    @property
    def prompt_id(self) -> str:
        return prompt_id(self.prompt)

    def prompt_record(self, split: Optional[str] = None) -> dict[str, Any]:
        return {
            "prompt_id": self.prompt_id,
            "prompt": self.prompt,
            "source": self.source,
            "index": self.index,
            "split": split,
        }

    def demonstration_record(self) -> dict[str, Any]:
        if self.completion is None:
            raise ValueError(f"{self.source}: record {self.index} has no completion")
        return {
            "prompt_id": self.prompt_id,
            "prompt": self.prompt,
            "completion": self.completion,
            "source_model": self.completion_model or "unknown",
            "finish_reason": normalize_finish_reason(self.finish_reason),
        }


@dataclasses.dataclass
class Stats:
    """Counts of records read, kept, and dropped by each documented filter."""

    read: int = 0
    kept: int = 0
    dropped: collections.Counter = dataclasses.field(default_factory=collections.Counter)

    def drop(self, reason: str) -> None:
        self.dropped[reason] += 1

    def as_dict(self) -> dict[str, Any]:
        return {"read": self.read, "kept": self.kept, "dropped": dict(sorted(self.dropped.items()))}
