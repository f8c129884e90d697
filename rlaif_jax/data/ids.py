"""Stable prompt ids: every stage keys its records by the same hash of the prompt text."""

from __future__ import annotations

import hashlib
from typing import Iterable, Mapping

PROMPT_ID_HEX_CHARS = 16


def prompt_id(text: str) -> str:
    """First 16 hex chars of sha256 over the UTF-8 prompt text (exact text, no normalization).

    Exact text (not stripped or case-folded) so the id of a prompt never changes between a
    reader and an API stage that sends that same text.
    """
    if not isinstance(text, str):
        raise TypeError(f"prompt_id needs str, got {type(text).__name__}")
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:PROMPT_ID_HEX_CHARS]


def id_conflicts(rows: Iterable[Mapping], key: str = "prompt_id", text: str = "prompt") -> dict[str, list[int]]:
    """{id: indices of its rows} for every id that `rows` give to more than one distinct
    `text`: two prompts under one id, which every later join on the id would mix up."""
    first_text: dict[str, str] = {}
    where: dict[str, list[int]] = {}
    bad: set[str] = set()
    for i, r in enumerate(rows):
        k = r[key]
        where.setdefault(k, []).append(i)
        if first_text.setdefault(k, r[text]) != r[text]:
            bad.add(k)
    return {k: where[k] for k in where if k in bad}
