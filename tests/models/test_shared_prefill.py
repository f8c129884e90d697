"""The sampler's two RNG modes and K samples sharing one prefill, against straightforward
loops (a full forward per token, no cache) and against K separate calls."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlaif_jax.models import DecoderConfig, apply, build_model, init_params
from rlaif_jax.sampling import SamplingParams, filter_logits, generate, generate_samples

PROMPTS = [[1, 10, 20, 30], [1, 7], [1, 3, 4, 5, 6, 8, 9, 11, 12, 13, 14, 15, 16, 17, 18, 19, 21]]
SP = SamplingParams(
    max_new_tokens=7, temperature=0.8, top_p=0.9, top_k=30, eos_ids=(5,), prompt_bucket=8, rng_per_prompt=True
)


@pytest.fixture(scope="module")
def tiny():
    cfg = DecoderConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8
    )
    model = build_model(cfg)
    return model, init_params(model, jax.random.key(0))


def _reference(model, params, prompt, key, sp):
    """Prompt i alone, one full forward per token: step t draws with fold_in(key, t) from the
    filtered, temperature-scaled logits at the last real position."""
    L = len(prompt) + sp.max_new_tokens
    fwd = jax.jit(lambda p, t, s: apply(model, p, t, None, s)["logits"])
    seq, logps = list(prompt), []
    for t in range(sp.max_new_tokens):
        toks = np.zeros((1, L), np.int32)
        segs = np.zeros((1, L), np.int32)
        toks[0, : len(seq)], segs[0, : len(seq)] = seq, 1
        logits = np.asarray(fwd(params, toks, segs))[0, len(seq) - 1] / sp.temperature
        filtered = filter_logits(jnp.asarray(logits)[None], sp.top_k, sp.top_p)[0]
        tok = int(jax.random.categorical(jax.random.fold_in(key, t), filtered))
        seq.append(tok)
        logps.append(float(jax.nn.log_softmax(logits)[tok]))
        if tok in sp.eos_ids:
            break
    return seq[len(prompt) :], logps


def _batch_reference(model, params, prompts, key, sp):
    """The default draws: step t splits the call's key once and draws every row with it from
    the [B, V] filtered logits (finished rows go on drawing; their tokens are dropped)."""
    fwd = jax.jit(lambda p, t, s: apply(model, p, t, None, s)["logits"])
    seqs, done = [list(p) for p in prompts], [False] * len(prompts)
    L = max(len(p) for p in prompts) + sp.max_new_tokens
    for _ in range(sp.max_new_tokens):
        rows = []
        for seq in seqs:
            toks, segs = np.zeros((1, L), np.int32), np.zeros((1, L), np.int32)
            toks[0, : len(seq)], segs[0, : len(seq)] = seq, 1
            rows.append(np.asarray(fwd(params, toks, segs))[0, len(seq) - 1] / sp.temperature)
        key, sub = jax.random.split(key)
        drawn = jax.random.categorical(sub, filter_logits(jnp.asarray(np.stack(rows)), sp.top_k, sp.top_p), axis=-1)
        for i, tok in enumerate(np.asarray(drawn).tolist()):
            if not done[i]:
                seqs[i].append(tok)
                done[i] = tok in sp.eos_ids
        if all(done):
            break
    return [s[len(p) :] for s, p in zip(seqs, prompts)]


def test_default_draws_one_key_per_step_for_the_batch(tiny):
    """rng_per_prompt=False (the default) keeps the draws the published tables were made
    with: one split of the call's key per step, shared by the batch."""
    model, params = tiny
    sp = dataclasses.replace(SP, rng_per_prompt=False)
    rng = jax.random.key(11)
    out = generate(model, params, PROMPTS, rng, sp)
    for i, toks in enumerate(_batch_reference(model, params, PROMPTS, rng, sp)):
        assert out.lengths[i] == len(toks)
        np.testing.assert_array_equal(out.tokens[i, : len(toks)], toks)
    # K samples without a shared prefill in this mode, but the same samples as K calls
    shared = generate_samples(model, params, PROMPTS, [jax.random.key(3), rng], sp)
    np.testing.assert_array_equal(shared[1].tokens, out.tokens)
    with pytest.raises(ValueError, match="rng_per_prompt"):
        dataclasses.replace(sp, slots=2)


def test_each_prompt_draws_from_its_own_key(tiny):
    """rng_per_prompt=True: row i of a batch is the per-prompt loop under fold_in(rng, i),
    whatever the batch."""
    model, params = tiny
    rng = jax.random.key(11)
    out = generate(model, params, PROMPTS, rng, SP)
    for i, p in enumerate(PROMPTS):
        toks, logps = _reference(model, params, p, jax.random.fold_in(rng, i), SP)
        n = out.lengths[i]
        assert n == len(toks)
        np.testing.assert_array_equal(out.tokens[i, :n], toks)
        np.testing.assert_allclose(out.logprobs[i, :n], logps, atol=1e-4)
        assert (out.tokens[i, n:] == SP.pad_id).all()


def test_shared_prefill_equals_separate_calls(tiny):
    model, params = tiny
    keys = [jax.random.key(s) for s in (3, 4, 5, 6)]
    shared = generate_samples(model, params, PROMPTS, keys, SP)
    assert len(shared) == 4
    for key, got in zip(keys, shared):
        alone = generate(model, params, PROMPTS, key, SP)
        np.testing.assert_array_equal(got.tokens, alone.tokens)
        np.testing.assert_array_equal(got.lengths, alone.lengths)
        np.testing.assert_allclose(got.logprobs, alone.logprobs, atol=1e-5)
    assert any((a.tokens != b.tokens).any() for a, b in zip(shared, shared[1:]))


def test_shared_prefill_in_slots_equals_separate_calls(tiny):
    """SamplingParams.slots: one prefill per prompt feeding its K rows inside continuous
    batching (fills of a prompt's rows split across refills, prompts padded to their own
    bucket) draws what K separate static calls draw."""
    model, params = tiny
    prompts = PROMPTS + [[1, 2], [1, 5, 6, 7, 8, 9, 10, 11, 12, 13]]
    keys = [jax.random.key(s) for s in (3, 4, 5)]
    sp = dataclasses.replace(SP, eos_ids=tuple(range(2, 14)))  # rows stop early: slots refill
    got = generate_samples(model, params, prompts, keys, dataclasses.replace(sp, slots=4))
    for key, g in zip(keys, got):
        alone = generate(model, params, prompts, key, sp)
        np.testing.assert_array_equal(g.tokens, alone.tokens)
        np.testing.assert_array_equal(g.lengths, alone.lengths)
        np.testing.assert_allclose(g.logprobs, alone.logprobs, atol=1e-5)
    assert len({int(n) for g in got for n in g.lengths}) > 1


def test_greedy_shared_samples_are_identical_and_legacy_keys_work(tiny):
    model, params = tiny
    sp = SamplingParams(max_new_tokens=5, temperature=0.0)
    a, b = generate_samples(model, params, PROMPTS, [jax.random.PRNGKey(0), jax.random.PRNGKey(1)], sp)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_array_equal(a.tokens, generate(model, params, PROMPTS, jax.random.PRNGKey(0), sp).tokens)
    with pytest.raises(ValueError, match="one key per sample"):
        generate_samples(model, params, PROMPTS, [], sp)
