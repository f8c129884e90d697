"""Stable prompt ids: every stage keys its records by the same hash of the prompt text."""

from __future__ import annotations

import hashlib

PROMPT_ID_HEX_CHARS = 16


def prompt_id(text: str) -> str:
    """First 16 hex chars of sha256 over the UTF-8 prompt text (exact text, no normalization).

    Exact text (not stripped or case-folded) so the id of a prompt never changes between a
    reader and an API stage that sends that same text.
    """
    if not isinstance(text, str):
        raise TypeError(f"prompt_id needs str, got {type(text).__name__}")
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:PROMPT_ID_HEX_CHARS]
