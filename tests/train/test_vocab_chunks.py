"""Log-probs by vocabulary chunks (train.vocab_chunks, DecoderConfig.vocab_chunk_size) against
the full-logits path: values and gradients, tied and untied heads, chunks that do not divide
the vocabulary, packed rows, SFT / DPO losses and PPO's response log-probs."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlaif_jax.errors import ConfigError
from rlaif_jax.models import build_model, init_params
from rlaif_jax.train.dpo import DPO
from rlaif_jax.train.logprobs import lm_forward, model_token_logps, segment_sums
from rlaif_jax.train.ppo import response_stats
from rlaif_jax.train.sft import SFT
from rlaif_jax.train.vocab_chunks import chunked_token_stats
from tests.train.fixtures import tiny_config

V = 37  # prime: no chunk size below divides it


def _reference(hidden, w_dv, targets, temperature):
    """Independent full-logits statistics: log_softmax, entropy, argmax."""
    logits = jnp.einsum("btd,dv->btv", hidden, w_dv) / temperature
    logp = jax.nn.log_softmax(logits, -1)
    picked = jnp.take_along_axis(logp, targets[..., None], -1)[..., 0]
    ent = -(jnp.exp(logp) * logp).sum(-1)
    return picked, ent, (jnp.argmax(logits, -1) == targets).astype(jnp.float32)


def _close(a, b, tol=1e-5):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=tol, atol=tol)


@pytest.mark.parametrize("vocab_axis", [0, 1])
@pytest.mark.parametrize("chunk", [5, V, 64])
def test_stats_and_gradients_match_full_logits(vocab_axis, chunk):
    k = jax.random.split(jax.random.key(0), 5)
    hidden = jax.random.normal(k[0], (2, 7, 16))
    w_dv = jax.random.normal(k[1], (16, V)) * 0.5
    targets = jax.random.randint(k[2], (2, 7), 0, V)
    g_logp, g_ent = jax.random.normal(k[3], (2, 7)), jax.random.normal(k[4], (2, 7))
    t = 0.7

    def chunked_loss(h, w_dv):
        w = w_dv.T if vocab_axis == 0 else w_dv
        s = chunked_token_stats(h, w, targets, chunk, vocab_axis, t)
        return (s.logp * g_logp).sum() + (s.entropy * g_ent).sum(), s

    def full_loss(h, w_dv):
        s = _reference(h, w_dv, targets, t)
        return (s[0] * g_logp).sum() + (s[1] * g_ent).sum(), s

    (lc, sc), gc = jax.value_and_grad(chunked_loss, argnums=(0, 1), has_aux=True)(hidden, w_dv)
    (lf, sf), gf = jax.value_and_grad(full_loss, argnums=(0, 1), has_aux=True)(hidden, w_dv)
    for a, b in zip(sc, sf):
        _close(a, b)
    _close(lc, lf)
    _close(gc[0], gf[0])
    _close(gc[1], gf[1])


def test_top1_ties_go_to_the_first_id_across_chunks():
    """Every logit appears twice, in different chunks: argmax's first-of-ties rule."""
    k = jax.random.split(jax.random.key(1), 2)
    half = jax.random.normal(k[0], (8, 10))
    w = jnp.concatenate([half, half], axis=1)  # [D, 20]: id i and i + 10 tie
    hidden = jax.random.normal(k[1], (1, 6, 8))
    first = jnp.argmax(jnp.einsum("btd,dv->btv", hidden, half), -1)
    targets = jnp.where(jnp.arange(6) % 2 == 0, first, first + 10)
    s = jax.jit(chunked_token_stats, static_argnums=(3, 4, 5))(hidden, w, targets, 3, 1, 1.0)
    np.testing.assert_array_equal(np.asarray(s.correct)[0], (np.arange(6) % 2 == 0).astype(np.float32))


def _packed_sft_batch():
    """Row 0 packs two sequences of 6; row 1 holds one of 9 and 3 padding tokens."""
    tokens = jax.random.randint(jax.random.key(2), (2, 12), 3, V)
    positions = jnp.array([list(range(6)) * 2, list(range(9)) + [0, 0, 0]])
    segment_ids = jnp.array([[1] * 6 + [2] * 6, [1] * 9 + [0] * 3])
    loss_mask = jnp.array([[0, 0, 1, 1, 1, 1, 0, 0, 0, 1, 1, 1], [0, 0, 0, 1, 1, 1, 1, 1, 1, 0, 0, 0]])
    return dict(tokens=tokens, positions=positions, segment_ids=segment_ids, loss_mask=loss_mask)


def _models(tied):
    kw = dict(tie_word_embeddings=tied, num_layers=1)
    full, chunk = build_model(tiny_config(V, **kw)), build_model(tiny_config(V, vocab_chunk_size=8, **kw))
    return full, chunk, init_params(full, jax.random.key(3))


def _compare_loss(objective, full, chunk, params, batch, ref_params=None):
    def loss(model):
        def f(p):
            loss_sum, weight, metrics = objective.loss(model, p, batch, ref_params, None)
            return loss_sum / weight, metrics

        return jax.jit(jax.value_and_grad(f, has_aux=True))(params)

    (lf, mf), gf = loss(full)
    (lc, mc), gc = loss(chunk)
    _close(lc, lf)
    for name in mf:
        _close(mc[name][0], mf[name][0])
    jax.tree.map(_close, gc, gf)


# Tied heads at model level in the DPO test, untied in SFT and PPO (both in the unit test
# above): a tiny model's compile is most of each test's time.
def test_sft_loss_metrics_and_gradients_match():
    full, chunk, params = _models(tied=False)
    batch = _packed_sft_batch()
    _compare_loss(SFT(), full, chunk, params, batch)
    assert "logits" not in jax.eval_shape(lambda p: lm_forward(chunk, p, *sft_args(batch)), params)  # never built


def test_dpo_loss_and_gradients_match():
    full, chunk, params = _models(tied=True)
    sft = _packed_sft_batch()
    shifted = dict(sft, tokens=(sft["tokens"] + 5) % V)
    batch = {f"chosen_{k}": v for k, v in sft.items()} | {f"rejected_{k}": v for k, v in shifted.items()}
    ref = jax.tree.map(lambda p: p * 0.9, params)
    _compare_loss(DPO(beta=0.5, rpo_alpha=0.3), full, chunk, params, batch, ref)
    # per-row sequence log-probs of the packed rows (the loss sees only their pair sums)
    seq = jax.jit(
        lambda m: model_token_logps(m, params, lm_forward(m, params, *sft_args(sft)), sft["tokens"]) * sft["loss_mask"],
        static_argnums=0,
    )
    _close(segment_sums(seq(chunk), sft["segment_ids"], 2), segment_sums(seq(full), sft["segment_ids"], 2))


def sft_args(b):
    return b["tokens"], b["positions"], b["segment_ids"]


@pytest.mark.slow  # ~20 s; the SFT and DPO model-level checks stay in the default suite
def test_ppo_response_logps_and_entropy_match():
    full, chunk, params = _models(False)
    b = _packed_sft_batch()
    P = 4

    def stats(model):
        def f(p):
            lp, ent = response_stats(model, p, lm_forward(model, p, *sft_args(b)), b["tokens"], P, 0.7)
            return lp.sum() + 0.1 * ent.sum(), (lp, ent)

        return jax.jit(jax.value_and_grad(f, has_aux=True))(params)

    (_, (lpc, entc)), gc = stats(chunk)
    (_, (lpf, entf)), gf = stats(full)
    _close(lpc, lpf)
    _close(entc, entf)
    jax.tree.map(_close, gc, gf)


def test_negative_chunk_size_is_a_config_error():
    with pytest.raises(ConfigError, match=r"DecoderConfig.vocab_chunk_size = -1"):
        tiny_config(V, vocab_chunk_size=-1)
