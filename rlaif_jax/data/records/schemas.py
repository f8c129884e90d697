"""Versioned record schemas, stored as `tf.train.Example` features.

Every field is a scalar feature: text as a one-element bytes_list (UTF-8), ints as
int64_list, floats as float_list. An optional field that is None is left out of the
Example. Bump a schema's version whenever a field is added, removed or changes meaning;
readers refuse a manifest whose version differs from the one they were written against.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional, Sequence

VERDICTS = ("first", "second", "tie", "invalid")
FINISH_REASONS = ("stop", "length", "content_filter", "unknown")
# Provider spellings -> the schema's (OpenAI's chat names; Anthropic's stop reasons).
_FINISH_ALIASES = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "eos": "stop",
    "max_tokens": "length",
    "model_length": "length",
    "refusal": "content_filter",
    "safety": "content_filter",
}


def normalize_finish_reason(value):
    """Maps a provider's finish / stop reason onto FINISH_REASONS (None -> "unknown")."""
    if value is None:
        return "unknown"
    value = _FINISH_ALIASES.get(value, value)
    if value not in FINISH_REASONS:
        raise ValueError(f"finish_reason {value!r} is not one of {FINISH_REASONS} or a known alias")
    return value


@dataclasses.dataclass(frozen=True)
class Field:
    name: str
    kind: str  # "str" | "int" | "float"
    required: bool = True
    choices: Optional[Sequence[Any]] = None
    doc: str = ""


@dataclasses.dataclass(frozen=True)
class Schema:
    name: str
    version: int
    fields: tuple[Field, ...]

    @property
    def field_map(self) -> Mapping[str, Field]:
        return {f.name: f for f in self.fields}

    def describe(self) -> dict:
        return {
            "name": self.name,
            "version": self.version,
            "fields": [{"name": f.name, "kind": f.kind, "required": f.required} for f in self.fields],
        }


def _text(name: str, required: bool = True, choices=None, doc: str = "") -> Field:
    return Field(name, "str", required, choices, doc)


PROMPTS = Schema(
    "prompts",
    1,
    (
        _text("prompt_id", doc="first 16 hex of sha256(prompt)"),
        _text("prompt"),
        _text("source", doc="dataset / file the prompt came from"),
        Field("index", "int", doc="the record's position in its source file (before filtering)"),
        _text("split", required=False, doc="'sft' / 'feedback' / free-form"),
    ),
)

DEMONSTRATIONS = Schema(
    "demonstrations",
    1,
    (
        _text("prompt_id"),
        _text("prompt"),
        _text("completion"),
        _text("source_model", doc="teacher that wrote the completion"),
        _text("finish_reason", choices=FINISH_REASONS),
    ),
)

COMPARISONS = Schema(
    "comparisons",
    1,
    (
        _text("prompt_id"),
        _text("prompt"),
        _text("response_1", doc="first response in canonical (un-swapped) order"),
        _text("response_2"),
        _text("model_1", required=False),
        _text("model_2", required=False),
        _text("judge", doc="critic model / annotator name"),
        _text("verdict", choices=VERDICTS, doc="in canonical order, after un-swapping"),
        _text("raw_judge_text", doc="the judge's answer verbatim"),
        Field("swapped", "int", choices=(0, 1), doc="1 if the judge saw response_2 first"),
    ),
)

PREFERENCES = Schema(
    "preferences",
    1,
    (
        _text("prompt_id"),
        _text("prompt"),
        _text("chosen"),
        _text("rejected"),
        _text("provenance", doc="where the label came from, e.g. judge and source file"),
        Field("ref_chosen_logp", "float", required=False, doc="sum of reference token log-probs"),
        Field("ref_rejected_logp", "float", required=False),
        _text("ref_model", required=False, doc="model that computed the ref log-probs"),
    ),
)

# Unpaired labelled completions (KTO): written from a critic's 1-5 ratings
# (rlaif_jax.feedback.ratings.rating_labels_stage) or by unpairing preference pairs.
LABELLED = Schema(
    "labelled",
    1,
    (
        _text("prompt_id"),
        _text("prompt"),
        _text("completion"),
        Field("label", "int", choices=(0, 1), doc="1 desirable, 0 undesirable"),
        _text("source", doc="where the label came from, e.g. the critic, its rating and threshold"),
        Field("rating", "float", required=False, doc="the critic's rating the label was read from"),
        _text("source_model", required=False, doc="model that wrote the completion"),
    ),
)

SCHEMAS = {s.name: s for s in (PROMPTS, DEMONSTRATIONS, COMPARISONS, PREFERENCES, LABELLED)}


def get_schema(name: str) -> Schema:
    try:
        return SCHEMAS[name]
    except KeyError:
        raise KeyError(f"unknown schema {name!r}; known: {sorted(SCHEMAS)}") from None
