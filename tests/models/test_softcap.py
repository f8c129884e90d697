"""Soft caps (Gemma 2) in every attention path and in the vocab-chunked log-probs: each against
the closed form cap * tanh(x / cap) applied to an explicit reference."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlaif_jax.models import DecoderConfig, build_model, decoder, init_params
from rlaif_jax.train.logprobs import lm_forward, model_token_logps
from rlaif_jax.train.vocab_chunks import chunked_token_stats

CAP = 2.0


def _qkv(T=12, S=12, H=4, KV=2, D=8):
    k = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(k[0], (2, T, H, D)) * 3
    kk = jax.random.normal(k[1], (2, S, KV, D)) * 3
    v = jax.random.normal(k[2], (2, S, KV, D))
    return q, kk, v


def _reference(q, k, v, window, scale, cap):
    """Plain numpy: repeat kv heads, scores * scale, cap, causal + window mask, softmax."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    g = q.shape[2] // k.shape[2]
    k, v = np.repeat(k, g, axis=2), np.repeat(v, g, axis=2)
    s = np.einsum("bthd,bshd->bhts", q, k) * scale
    s = cap * np.tanh(s / cap)
    T = q.shape[1]
    i, j = np.arange(T)[:, None], np.arange(T)[None, :]
    mask = (j <= i) & ((i - j) < (window or T + 1))
    s = np.where(mask, s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bhts,bshd->bthd", p, v)


def test_attention_kernels_cap_scores():
    window = 5
    q, k, v = _qkv()
    pos = jnp.broadcast_to(jnp.arange(12), (2, 12))
    seg = jnp.ones((2, 12), jnp.int32)
    scale = 0.3
    ref = _reference(q, k, v, window, scale, CAP)
    kw = dict(scale=scale, logit_softcap=CAP)
    outs = {
        "einsum": decoder.einsum_attention(q, k, v, pos, seg, pos, seg, window, **kw),
        "xla": decoder.fused_attention("xla", q, k, v, pos, seg, window, **kw),
        # traced window, as inside the scan over layers
        "traced": jax.jit(lambda w: decoder.einsum_attention(q, k, v, pos, seg, pos, seg, w, **kw))(
            jnp.int32(window or 2**30)
        ),
    }
    # The blocked KV-cache read (decode_block 4 < 12 slots): the last query against the cache.
    cache = {"k": k, "v": v, "pos": pos, "seg": seg}
    outs["filled"] = jnp.concatenate(
        [
            jnp.zeros_like(q[:, :11]),
            decoder.filled_attention(q[:, 11:], cache, pos[:, 11:], seg[:, 11:], 12, window, 4, **kw),
        ],
        axis=1,
    )
    for name, out in outs.items():
        got = np.asarray(out)
        if name == "filled":
            got, want = got[:, 11:], ref[:, 11:]
        else:
            want = ref
        np.testing.assert_allclose(got, want, atol=2e-5, err_msg=name)
    assert np.abs(ref - _reference(q, k, v, window, scale, 1e9)).max() > 1e-2  # the cap matters here
    decoder.SPLASH_INTERPRET = True
    try:
        T = 128
        q2, k2, v2 = _qkv(T, T)
        pos2 = jnp.broadcast_to(jnp.arange(T), (2, T))
        seg2 = jnp.ones((2, T), jnp.int32)
        splash = decoder.fused_attention("splash", q2, k2, v2, pos2, seg2, window, **kw)
        np.testing.assert_allclose(np.asarray(splash), _reference(q2, k2, v2, window, scale, CAP), atol=1e-4)
    finally:
        decoder.SPLASH_INTERPRET = False


def test_cudnn_with_a_cap_falls_back_to_xla_with_a_logged_reason(monkeypatch, caplog):
    q, k, v = _qkv()
    pos = jnp.broadcast_to(jnp.arange(12), (2, 12))
    seg = jnp.ones((2, 12), jnp.int32)
    monkeypatch.setattr(decoder, "_LOGGED", set())
    with caplog.at_level(logging.WARNING, logger=decoder.__name__):
        out = decoder.fused_attention("cudnn", q, k, v, pos, seg, None, scale=0.3, logit_softcap=CAP)
    assert "no attention-logit soft cap" in caplog.text and "running 'xla'" in caplog.text
    np.testing.assert_allclose(np.asarray(out), _reference(q, k, v, None, 0.3, CAP), atol=2e-5)
    cfg = DecoderConfig(
        vocab_size=8, hidden_size=16, intermediate_size=8, num_layers=1, num_heads=2, num_kv_heads=2,
        attn_logit_softcap=CAP,
    )  # fmt: skip
    assert decoder.resolve_attention_impl(cfg, 128) == "einsum"  # auto on CPU: unchanged


@pytest.mark.parametrize("vocab_axis", [0, pytest.param(1, marks=pytest.mark.slow)])  # 0: Gemma's tied head
def test_chunked_logps_cap_values_and_gradients(vocab_axis):
    V = 37
    k = jax.random.split(jax.random.key(1), 4)
    hidden = jax.random.normal(k[0], (2, 7, 16))
    w_dv = jax.random.normal(k[1], (16, V))
    targets = jax.random.randint(k[2], (2, 7), 0, V)
    g = jax.random.normal(k[3], (2, 7))
    t = 0.7

    def chunked(h, w_dv):
        w = w_dv.T if vocab_axis == 0 else w_dv
        s = chunked_token_stats(h, w, targets, 5, vocab_axis, t, CAP)
        return (s.logp * g).sum() + s.entropy.sum()

    def full(h, w_dv):
        logits = CAP * jnp.tanh(jnp.einsum("btd,dv->btv", h, w_dv) / CAP) / t
        logp = jax.nn.log_softmax(logits, -1)
        ent = -(jnp.exp(logp) * logp).sum(-1)
        return (jnp.take_along_axis(logp, targets[..., None], -1)[..., 0] * g).sum() + ent.sum()

    vc, gc = jax.jit(jax.value_and_grad(chunked, argnums=(0, 1)))(hidden, w_dv)
    vf, gf = jax.jit(jax.value_and_grad(full, argnums=(0, 1)))(hidden, w_dv)
    np.testing.assert_allclose(vc, vf, rtol=1e-5)
    for a, b in zip(gc, gf):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-5)


def test_gemma2_shaped_model_chunked_logps_use_the_final_cap():
    """A tiny Gemma-2-shaped model: the objectives' vocab-chunked log-probs equal the full
    logits' (whose final cap test_families checks against HF)."""
    cfg = DecoderConfig(
        model_type="gemma2", hidden_act="gelu_pytorch_tanh", vocab_size=37, hidden_size=32, intermediate_size=48,
        num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, query_pre_attn_scalar=12, sliding_window=3,
        layer_types=("sliding_attention", "full_attention"), attn_logit_softcap=1.5, final_logit_softcap=1.0,
        tie_word_embeddings=True, initializer_range=0.5,
    )  # fmt: skip
    model = build_model(cfg)
    params = init_params(model, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (2, 9), 0, 37)
    pos = jnp.broadcast_to(jnp.arange(9), (2, 9))
    seg = jnp.ones((2, 9), jnp.int32)
    chunk = build_model(cfg.replace(vocab_chunk_size=8))

    @jax.jit
    def logps(params):
        full = lm_forward(model, params, tokens, pos, seg)
        assert "logits" in full
        return (
            model_token_logps(chunk, params, lm_forward(chunk, params, tokens, pos, seg), tokens),
            model_token_logps(model, params, full, tokens),
            full["logits"],
        )

    lp_chunk, lp_full, logits = logps(params)
    assert float(jnp.abs(logits).max()) <= 1.0  # the final cap bounds them
    np.testing.assert_allclose(np.asarray(lp_chunk), np.asarray(lp_full), atol=1e-5)
