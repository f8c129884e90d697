"""The KV cache: a sliding-window model's ring of `window` slots and decode attention that
reads only the filled blocks, each against an independent reference (a cache as long as the
sequence, full re-forwards without a cache, the whole-cache einsum)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlaif_jax import sampling
from rlaif_jax.models import DecoderConfig, apply, build_model, decoder, init_params, kv_cache

WINDOW = 6
# Lengths 3, 9 and 13 in a batch, left-padded to P = 16 (prompt_bucket 4): two prompts longer
# than the window, and P + new tokens = 26 > window.
PROMPTS = [[1, 5, 9], [1, 7, 3, 8, 2, 11, 4, 6, 9], [1, 3, 4, 5, 6, 8, 9, 11, 12, 13, 14, 15, 16]]
NEW = 10


def _cfg(**kw):
    base = dict(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=8,
        model_type="mistral",
        sliding_window=WINDOW,
        # Wide weights: peaked logits, so greedy ties cannot hide a wrong attention pattern.
        initializer_range=0.3,
        attention_impl="einsum",
    )
    return DecoderConfig(**{**base, **kw})


@functools.lru_cache(maxsize=None)
def _params(window):
    return init_params(build_model(_cfg(sliding_window=window)), jax.random.key(0))


def _greedy(cfg, cache_cfg=None):
    """sampling._generate (jitted here, not through its per-model cache) on PROMPTS; with
    `cache_cfg`, the cache is shaped for that config (None: the model's own). Returns the
    tokens, log-probs and the cache's shape."""
    sp = sampling.SamplingParams(max_new_tokens=NEW, temperature=0.0, prompt_bucket=4)
    shapes = []

    def init(c, batch, length):
        cache = kv_cache.init_cache(cache_cfg or c, batch, length)
        shapes.append(cache["k"].shape)
        return cache

    model = build_model(cfg)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sampling, "init_cache", init)
        fn = jax.jit(functools.partial(sampling._generate, model, sp))
        toks, lens, logps = fn(_params(cfg.sliding_window), *sampling.left_pad(PROMPTS, 0, 4), jax.random.key(0))
    assert (np.asarray(lens) == NEW).all()
    return np.asarray(toks), np.asarray(logps), shapes[0]


def _reforward(cfg):
    """Greedy decoding with a full forward pass over the whole sequence per token (no cache);
    rows right-padded to one length so one compiled forward serves every step."""
    model, params = build_model(cfg), _params(cfg.sliding_window)
    L = max(map(len, PROMPTS)) + NEW
    fwd = jax.jit(lambda t, s: apply(model, params, t, jnp.broadcast_to(jnp.arange(L), t.shape), s)["logits"])
    seqs = [list(p) for p in PROMPTS]
    toks, logps = np.zeros((len(seqs), NEW), np.int32), np.zeros((len(seqs), NEW), np.float32)
    for i in range(NEW):
        t = np.zeros((len(seqs), L), np.int32)
        s = np.zeros((len(seqs), L), np.int32)
        for r, q in enumerate(seqs):
            t[r, : len(q)], s[r, : len(q)] = q, 1
        logits = np.asarray(fwd(t, s), np.float64)
        for r, q in enumerate(seqs):
            row = logits[r, len(q) - 1]
            last = row - row.max() - np.log(np.exp(row - row.max()).sum())
            toks[r, i] = int(np.argmax(last))
            logps[r, i] = last[toks[r, i]]
            q.append(toks[r, i])
    return toks, logps


def test_ring_cache_equals_full_cache_and_full_reforward():
    cfg = _cfg()
    ring_t, ring_lp, ring_shape = _greedy(cfg)
    full_t, full_lp, full_shape = _greedy(cfg, cache_cfg=_cfg(sliding_window=None))
    ref_t, ref_lp = _reforward(cfg)
    # The ring holds `window` slots; the plain cache the whole prompt + new tokens.
    assert ring_shape == (2, 3, WINDOW, 2, 8) and full_shape == (2, 3, 16 + NEW, 2, 8)
    np.testing.assert_array_equal(ring_t, ref_t)
    np.testing.assert_array_equal(full_t, ref_t)
    np.testing.assert_allclose(ring_lp, ref_lp, atol=1e-4)
    np.testing.assert_allclose(full_lp, ref_lp, atol=1e-4)


def test_cache_slots_are_the_window_not_the_length():
    cfg = _cfg()
    assert kv_cache.init_cache(cfg, 2, 100_000)["k"].shape == (2, 2, WINDOW, 2, 8)
    assert kv_cache.init_cache(cfg, 2, 100_000)["pos"].shape == (2, 2, WINDOW)
    assert kv_cache.init_cache(cfg, 2, 4)["k"].shape[2] == 4  # shorter than the window: no ring
    assert kv_cache.init_cache(_cfg(sliding_window=None), 2, 100)["k"].shape[2] == 100


def test_chunked_prefill_into_a_ring_equals_one_forward():
    """Multi-token calls into a ring that already holds keys (the second chunk overwrites
    slots its own first queries still see) give a full forward's logits."""
    cfg = _cfg()
    model, params = build_model(cfg), _params(WINDOW)
    tokens = jnp.asarray([PROMPTS[2] + [7, 8, 9]], jnp.int32)  # 16 tokens: chunks of 9 and 7
    pos = jnp.arange(16, dtype=jnp.int32)[None]
    seg = jnp.ones_like(pos)

    @jax.jit
    def run():
        ref = apply(model, params, tokens, pos, seg)["logits"]
        cache = kv_cache.init_cache(cfg, 1, 16)
        a = apply(model, params, tokens[:, :9], pos[:, :9], seg[:, :9], cache=cache, cache_index=jnp.int32(0))
        b = apply(model, params, tokens[:, 9:], pos[:, 9:], seg[:, 9:], cache=a["cache"], cache_index=jnp.int32(9))
        return ref, a["logits"], b["logits"], b["cache"]["k"].shape

    ref, a, b, shape = run()
    assert shape[2] == WINDOW
    np.testing.assert_allclose(np.asarray(a), np.asarray(ref)[:, :9], atol=1e-5)
    np.testing.assert_allclose(np.asarray(b), np.asarray(ref)[:, 9:], atol=1e-5)


@pytest.mark.parametrize("window", [pytest.param(None, marks=pytest.mark.slow), WINDOW])
def test_filled_block_decode_equals_whole_cache_decode(window):
    """Blocks of 4 slots (26-slot plain cache: the last block overlaps the one before; 6-slot
    ring: two blocks) against decode_block 0, the whole-cache einsum of before."""
    blocked_t, blocked_lp, _ = _greedy(_cfg(sliding_window=window, decode_block=4))
    whole_t, whole_lp, _ = _greedy(_cfg(sliding_window=window, decode_block=0))
    np.testing.assert_array_equal(blocked_t, whole_t)
    np.testing.assert_allclose(blocked_lp, whole_lp, atol=1e-5)


def test_filled_attention_never_reads_past_the_filled_blocks():
    """NaN keys and values in every block past the filled ones would poison any read of them
    (0 * NaN); the output equals the einsum over the filled slots alone."""
    B, S, KV, D, H, block, filled = 2, 20, 2, 8, 4, 4, 9
    ks = jax.random.split(jax.random.key(1), 3)
    q = jax.random.normal(ks[0], (B, 1, H, D))
    k = jax.random.normal(ks[1], (B, S, KV, D))
    v = jax.random.normal(ks[2], (B, S, KV, D))
    slot = np.arange(S)
    seg = np.where(slot < filled, 1, 0)[None].repeat(B, 0)
    seg[1, :3] = 0  # row 1 left-padded
    pos = np.stack([slot, np.clip(slot - 3, 0, None)])
    q_pos = jnp.asarray(pos[:, filled - 1 : filled])
    q_seg = jnp.ones((B, 1), jnp.int32)
    past = slot >= 12  # blocks 3, 4: wholly past slot 8, the last filled one

    @jax.jit
    def run(filled):
        ref = decoder.einsum_attention(q, k, v, q_pos, q_seg, jnp.asarray(pos), jnp.asarray(seg), None)
        poisoned = {
            "k": jnp.where(past[None, :, None, None], jnp.nan, k),
            "v": jnp.where(past[None, :, None, None], jnp.nan, v),
            "pos": jnp.asarray(pos),
            "seg": jnp.asarray(seg),
        }
        blocked = decoder.filled_attention(q, poisoned, q_pos, q_seg, filled, None, block)
        return ref, blocked, decoder.filled_attention(q, poisoned, q_pos, q_seg, filled, None, 0)

    ref, out, whole = run(jnp.int32(filled))
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5)
    assert np.isnan(np.asarray(whole)).all()  # the whole-cache read does see them


def test_decode_block_is_checked():
    from rlaif_jax.errors import ConfigError

    with pytest.raises(ConfigError, match=r"DecoderConfig.decode_block = -1: must be a whole number >= 0"):
        _cfg(decode_block=-1)
