"""What identifies a tokenizer to the model trained with it: its vocabulary and bos / eos ids
(what the embedding rows mean). save_hf writes it beside every export's config.json, so a run
given the weights without that tokenizer's files is still checked against it (rlaif_jax.preflight);
the data pipeline's resume fingerprint holds the same hash. It lives with the models because
every export writes it; rlaif_jax.data.tokenize.tokenizer hands the names on.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Optional


def tokenizer_hash(tok: Any) -> str:
    """Identifies a tokenizer's vocabulary and bos / eos ids (what a model's embedding rows
    mean): the data pipeline's resume fingerprint and the run preflight (rlaif_jax.preflight)
    compare it. The same value as rlaif_jax.data.pipeline.iterator.fingerprint(vocab=..,
    bos=.., eos=..), which run directories already hold."""
    parts = {"vocab": sorted(tok.get_vocab().items()), "bos": tok.bos_token_id, "eos": tok.eos_token_id}
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


# Written beside every export's config.json (save_hf): the tokenizer the model was trained
# with, so a run given the weights without that tokenizer's files is still checked against it.
FINGERPRINT_FILE = "tokenizer_fingerprint.json"


def save_fingerprint(directory: str, tok: Any) -> None:
    """Writes FINGERPRINT_FILE: tokenizer_hash, size and bos / eos ids of `tok`."""
    fp = {"tokenizer_hash": tokenizer_hash(tok), "tokens": len(tok), "bos": tok.bos_token_id, "eos": tok.eos_token_id}
    with open(os.path.join(directory, FINGERPRINT_FILE), "w") as f:
        json.dump(fp, f, indent=2)


def saved_fingerprint(directory: str) -> Optional[dict]:
    """FINGERPRINT_FILE of a model directory, or None (an export older than it, or not ours)."""
    path = os.path.join(directory, FINGERPRINT_FILE)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        fp = json.load(f)
    return fp if isinstance(fp, dict) and isinstance(fp.get("tokenizer_hash"), str) else None
