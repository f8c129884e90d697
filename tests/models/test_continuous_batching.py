"""Continuous batching (SamplingParams.slots) gives the static sampler's samples for the same
key: a plain cache and a sliding-window ring, rows stopping early at EOS and refilled, with
each row's new key written by a scatter (CPU / GPU) or a select (TPU)."""

import dataclasses

import jax
import numpy as np
import pytest

from rlaif_jax.models import DecoderConfig, build_model, init_params
from rlaif_jax.sampling import SamplingParams, generate

PROMPTS = [[1, 10, 20, 30], [1, 7], [1, 3, 4, 5, 6, 8, 9, 11, 12, 13, 14, 15, 16, 17, 18], [1, 2], [1, 9, 9, 9, 9]]


@pytest.mark.parametrize("window", [None, pytest.param(6, marks=pytest.mark.slow)])  # 6: a ring cache
def test_slots_give_the_static_samples(window):
    cfg = DecoderConfig(
        vocab_size=24,
        hidden_size=32,
        intermediate_size=48,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=8,
        sliding_window=window,
        model_type="mistral" if window else "llama",
    )
    model = build_model(cfg)
    params = init_params(model, jax.random.key(0))
    # A small vocabulary with EOS id 3: rows stop at different steps, so slots free up early.
    sp = SamplingParams(
        max_new_tokens=9, temperature=1.0, top_p=0.95, eos_ids=(3,), prompt_bucket=8, rng_per_prompt=True
    )
    static = generate(model, params, PROMPTS, jax.random.key(5), sp)
    assert len(set(static.lengths.tolist())) > 1
    for row_write in ("scatter", "select"):
        m = build_model(dataclasses.replace(cfg, kv_row_write=row_write))
        cont = generate(m, params, PROMPTS, jax.random.key(5), dataclasses.replace(sp, slots=2))
        np.testing.assert_array_equal(cont.tokens, static.tokens)
        np.testing.assert_array_equal(cont.lengths, static.lengths)
        np.testing.assert_allclose(cont.logprobs, static.logprobs, atol=1e-5)


def test_bad_slots_are_rejected():
    with pytest.raises(ValueError, match="slots"):
        SamplingParams(slots=-1)
