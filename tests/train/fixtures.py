"""Small on-disk datasets and a tiny model for trainer tests."""

from __future__ import annotations

import functools

import numpy as np

from rlaif_jax.data.pipeline.builders import preference_pipeline, sft_pipeline
from rlaif_jax.data.toy import write_toy_world
from rlaif_jax.models import DecoderConfig


def tiny_config(vocab_size: int, **kw) -> DecoderConfig:
    base = dict(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    base.update(kw)
    return DecoderConfig(**base)


def make_world(root: str, n: int = 32):
    """(tokenizer, tokenizer dir, demonstrations dir, preferences dir) of the toy world."""
    w = write_toy_world(root, n)
    return w["tok"], w["tokenizer"], w["demonstrations"], w["preferences"]


def sft_data(demo_dir, batch_size=8, seq_len=32, **kw):
    return functools.partial(
        sft_pipeline,
        demo_dir,
        batch_size=batch_size,
        seq_len=seq_len,
        max_length=seq_len,
        max_prompt_length=seq_len // 2,
        prefetch=0,
        **kw,
    )


def pref_data(pref_dir, batch_size=8, seq_len=32, **kw):
    return functools.partial(
        preference_pipeline,
        pref_dir,
        batch_size=batch_size,
        seq_len=seq_len,
        max_length=seq_len,
        max_prompt_length=seq_len // 2,
        prefetch=0,
        **kw,
    )


LOOP_FIELDS = ("log_every", "checkpoint_every", "keep_checkpoints", "async_checkpoint", "export_hf")


def loop_args(args: dict) -> dict:
    """A trainer's keyword arguments with the run-loop settings among them (log_every=...)
    gathered into loop=LoopSettings(...)."""
    from rlaif_jax.train.run_loop import LoopSettings

    args = dict(args)
    settings = {k: args.pop(k) for k in LOOP_FIELDS if k in args}
    if settings:
        args["loop"] = LoopSettings(**settings)
    return args


def random_rows(rs, n: int, lengths, seq_len: int, vocab: int, prefix: str = "") -> dict:
    """n rows of random tokens (ids 3..vocab-1) whose loss mask covers `lengths[i]` tokens
    from position 4: the batch keys an objective reads, under `prefix` (chosen_, kl_, ...)."""
    out = {
        f"{prefix}tokens": rs.randint(3, vocab, (n, seq_len)).astype(np.int32),
        f"{prefix}positions": np.tile(np.arange(seq_len, dtype=np.int32), (n, 1)),
        f"{prefix}segment_ids": np.ones((n, seq_len), np.int32),
    }
    mask = np.zeros((n, seq_len), np.float32)
    for i, k in enumerate(lengths):
        mask[i, 4 : 4 + k] = 1
    out[f"{prefix}loss_mask"] = mask
    return out
