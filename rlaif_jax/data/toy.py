"""A tiny rule-based dataset for smoke runs and tests: the answer to a list of words is the
same words reversed. Demonstrations teach it; preference pairs prefer the reversed list
over the unchanged one. Learnable by a 100k-parameter model in a minute on a CPU."""

from __future__ import annotations

import os

from rlaif_jax.data.ids import prompt_id
from rlaif_jax.data.records import DEMONSTRATIONS, PREFERENCES, write_records
from rlaif_jax.data.tokenize.tokenizer import build_test_tokenizer

WORDS = "red green blue yellow black white cat dog bird fish one two three four five six".split()


def toy_prompts(n: int) -> list[str]:
    return [" ".join(WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(3 + i % 3)) for i in range(n)]


def write_toy_world(root: str, n: int = 32, num_shards: int = 2) -> dict:
    """Writes root/{tokenizer,demonstrations,preferences}; returns their paths and the tokenizer."""
    prompts = toy_prompts(n)
    answers = [" ".join(p.split()[::-1]) for p in prompts]
    tok_dir = os.path.join(root, "tokenizer")
    tok = build_test_tokenizer(tok_dir, texts=prompts + ["Human: Assistant:"] + WORDS)
    demos = os.path.join(root, "demonstrations")
    write_records(
        demos,
        DEMONSTRATIONS,
        [
            {"prompt_id": prompt_id(p), "prompt": p, "completion": a, "source_model": "rule", "finish_reason": "stop"}
            for p, a in zip(prompts, answers)
        ],
        num_shards=num_shards,
        provenance={"generator": "rlaif_jax.data.toy"},
    )
    prefs = os.path.join(root, "preferences")
    write_records(
        prefs,
        PREFERENCES,
        [
            {"prompt_id": prompt_id(p), "prompt": p, "chosen": a, "rejected": p, "provenance": "rule"}
            for p, a in zip(prompts, answers)
        ],
        provenance={"generator": "rlaif_jax.data.toy"},
    )
    return {"tokenizer": tok_dir, "demonstrations": demos, "preferences": prefs, "tok": tok}
