"""The blocked CPU attention (models/blocked_attention.py) against einsum_attention, the
reference: packed rows with padding, GQA, sliding windows, Gemma 2's logit soft-cap, query
blocks with and without key blocks, forward and gradients through the decoder."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlaif_jax.models import DecoderConfig, apply, build_model, decoder, init_params
from rlaif_jax.models.blocked_attention import blocked_attention
from rlaif_jax.models.decoder import einsum_attention

T = 24


def _packed(seed=0):
    """Two rows: two segments each (positions restart), the second row ends in padding."""
    seg = np.zeros((2, T), np.int32)
    seg[0, :13], seg[0, 13:] = 1, 2
    seg[1, :8], seg[1, 8:18] = 1, 2
    pos = np.zeros((2, T), np.int32)
    for r in range(2):
        for s in (1, 2):
            idx = np.nonzero(seg[r] == s)[0]
            pos[r, idx] = np.arange(len(idx))
    rs = np.random.RandomState(seed)
    q, k, v = (jnp.asarray(rs.randn(2, T, h, 8), jnp.float32) for h in (4, 2, 2))
    return q, k, v, jnp.asarray(pos), jnp.asarray(seg)


def _softcapped_reference(q, k, v, pos, seg, window, cap):
    """einsum_attention's maths with Gemma 2's cap on the scaled scores."""
    B, _, H, D = q.shape
    KV = k.shape[2]
    s = jnp.einsum("btkgd,bskd->bkgts", q.reshape(B, T, KV, H // KV, D), k) * D**-0.5
    s = cap * jnp.tanh(s / cap)
    s = jnp.where(decoder.attention_mask(pos, seg, pos, seg, window)[:, None, None], s, -1e30)
    return jnp.einsum("bkgts,bskd->btkgd", jax.nn.softmax(s, -1), v).reshape(B, T, H, D)


@pytest.mark.parametrize("window,block,kv_block", [(None, 8, 0), (5, 8, 3), (None, 5, 4), (5, 32, 0)])
def test_matches_einsum_with_gradients(window, block, kv_block):
    q, k, v, pos, seg = _packed()
    real = np.asarray(seg != 0)  # padding queries' outputs are never used
    w = jax.random.normal(jax.random.key(3), q.shape) * (seg != 0)[..., None, None]

    def run(fn):
        f = lambda q, k, v: fn(q, k, v, pos, seg, pos, seg, window)  # noqa: E731
        return jax.jit(lambda *a: (f(*a), jax.grad(lambda *b: jnp.sum(f(*b) * w), argnums=(0, 1, 2))(*a)))(q, k, v)

    ref, ref_g = run(einsum_attention)
    out, out_g = run(functools.partial(blocked_attention, block=block, kv_block=kv_block))
    np.testing.assert_allclose(np.asarray(out)[real], np.asarray(ref)[real], atol=1e-5, rtol=1e-5)
    for a, b in zip(out_g, ref_g):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("window,kv_block", [(None, 0), (5, 3)])
def test_logit_softcap_matches_reference(window, kv_block):
    q, k, v, pos, seg = _packed(1)
    q = q * 6  # scores large enough that the cap bites
    ref = _softcapped_reference(q, k, v, pos, seg, window, 2.0)
    out = blocked_attention(q, k, v, pos, seg, pos, seg, window, logit_softcap=2.0, block=8, kv_block=kv_block)
    real = np.asarray(seg != 0)
    np.testing.assert_allclose(np.asarray(out)[real], np.asarray(ref)[real], atol=1e-5, rtol=1e-5)
    uncapped = blocked_attention(q, k, v, pos, seg, pos, seg, window, block=8, kv_block=kv_block)
    assert np.abs(np.asarray(uncapped - out)[real]).max() > 1e-3


@pytest.mark.slow  # the kernel's own gradients are checked above; this is the decoder's wiring
def test_decoder_logits_and_gradients_match_einsum(monkeypatch):
    cfg = dict(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=1, num_heads=4, num_kv_heads=2, head_dim=8
    )
    cfg = functools.partial(DecoderConfig, **cfg, sliding_window=7, model_type="mistral")
    _, _, _, pos, seg = _packed()
    tokens = jax.random.randint(jax.random.key(2), (2, T), 0, 64)
    params = init_params(build_model(cfg(attention_impl="einsum")), jax.random.key(0))
    w = jax.random.normal(jax.random.key(1), (2, T, 64))
    real = (seg != 0)[..., None]

    def run(impl):
        model = build_model(cfg(attention_impl=impl))

        def loss(p):
            logits = apply(model, p, tokens, pos, seg)["logits"]
            return jnp.sum(jnp.where(real, logits * w, 0.0)), logits

        return jax.jit(jax.value_and_grad(loss, has_aux=True))(params)

    (_, ref_l), ref_g = run("einsum")
    monkeypatch.setattr(decoder, "blocked_attention", functools.partial(blocked_attention, block=8, kv_block=4))
    (_, out_l), out_g = run("blocked")
    m = np.asarray(seg != 0)
    np.testing.assert_allclose(np.asarray(out_l)[m], np.asarray(ref_l)[m], atol=1e-5, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(out_g), jax.tree.leaves(ref_g)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-4)


def test_auto_on_cpu_blocks_long_sequences_only():
    if jax.default_backend() != "cpu":
        pytest.skip("'auto' picks a fused kernel on accelerators")
    cfg = DecoderConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=1, num_heads=4, num_kv_heads=2, head_dim=8
    )
    assert decoder.resolve_attention_impl(cfg, decoder.BLOCKED_MIN_LENGTH) == "blocked"
    assert decoder.resolve_attention_impl(cfg, decoder.BLOCKED_MIN_LENGTH - 1) == "einsum"


@pytest.mark.parametrize("local", [True, False])
def test_traced_window_scale_and_cap_match_einsum(local):
    """Gemma's layers inside the scan: the window is traced (the layer's own, or no window as
    int32 max), the scores' scale is query_pre_attn_scalar's, and the cap applies."""
    q, k, v, pos, seg = _packed(2)
    q = q * 4
    kw = dict(scale=0.2, logit_softcap=3.0)

    def run(fn, flag):
        window = jnp.where(flag, 5, jnp.iinfo(jnp.int32).max)
        return fn(q, k, v, pos, seg, pos, seg, window, **kw)

    ref = jax.jit(functools.partial(run, einsum_attention))(local)
    out = jax.jit(functools.partial(run, functools.partial(blocked_attention, block=8, kv_block=3)))(local)
    real = np.asarray(seg != 0)
    np.testing.assert_allclose(np.asarray(out)[real], np.asarray(ref)[real], atol=1e-5, rtol=1e-5)
    static = einsum_attention(q, k, v, pos, seg, pos, seg, 5 if local else None, **kw)
    np.testing.assert_allclose(np.asarray(out)[real], np.asarray(static)[real], atol=1e-5, rtol=1e-5)
