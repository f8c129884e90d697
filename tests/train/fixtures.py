"""Small on-disk datasets and a tiny model for trainer tests."""

from __future__ import annotations

import functools
import os

from rlaif_jax.data.pipeline.builders import preference_pipeline, sft_pipeline
from rlaif_jax.data.records import DEMONSTRATIONS, PREFERENCES, write_records
from rlaif_jax.data.tokenize import build_test_tokenizer
from rlaif_jax.data import prompt_id
from rlaif_jax.models import DecoderConfig

WORDS = "red green blue yellow black white cat dog bird fish one two three four five six".split()


def tiny_config(vocab_size: int, **kw) -> DecoderConfig:
    base = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                num_kv_heads=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    base.update(kw)
    return DecoderConfig(**base)


def make_world(root: str, n: int = 32):
    """A tokenizer, demonstrations (answer = the prompt's words reversed: learnable) and
    preferences (chosen = reversed, rejected = the words unchanged)."""
    prompts = [" ".join(WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(3 + i % 3)) for i in range(n)]
    rev = [" ".join(p.split()[::-1]) for p in prompts]
    tok_dir = os.path.join(root, "tok")
    tok = build_test_tokenizer(tok_dir, texts=prompts + ["Human: Assistant:"] + WORDS)
    demo_dir = os.path.join(root, "demos")
    write_records(demo_dir, DEMONSTRATIONS, [
        {"prompt_id": prompt_id(p), "prompt": p, "completion": r, "source_model": "rule", "finish_reason": "stop"}
        for p, r in zip(prompts, rev)
    ], num_shards=2)
    pref_dir = os.path.join(root, "prefs")
    write_records(pref_dir, PREFERENCES, [
        {"prompt_id": prompt_id(p), "prompt": p, "chosen": r, "rejected": p, "provenance": "rule"}
        for p, r in zip(prompts, rev)
    ])
    return tok, tok_dir, demo_dir, pref_dir


def sft_data(demo_dir, batch_size=8, seq_len=32, **kw):
    return functools.partial(sft_pipeline, demo_dir, batch_size=batch_size, seq_len=seq_len,
                             max_length=seq_len, max_prompt_length=seq_len // 2, prefetch=0, **kw)


def pref_data(pref_dir, batch_size=8, seq_len=32, **kw):
    return functools.partial(preference_pipeline, pref_dir, batch_size=batch_size, seq_len=seq_len,
                             max_length=seq_len, max_prompt_length=seq_len // 2, prefetch=0, **kw)
