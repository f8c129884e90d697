"""Next-token log-probs, entropy and top-1 correctness from the final hidden states and the
LM-head weight, one slice of the vocabulary at a time: neither the forward nor the backward
pass holds the [B, T, V] float32 logits (3.4 GB for 16 rows of 512 tokens over a 102400-token
vocabulary), only [B, T, chunk] of them.

Forward: a scan over contiguous vocabulary chunks keeps a running logsumexp (max and scaled
sum), the running sum of exp(l) * l (for the entropy), the target's logit (picked in the
chunk that holds it) and the running top-1 (value, id). Backward (custom_vjp): a second scan
recomputes each chunk's logits and turns them into d logits with the saved logsumexp and
mean logit,
  d logp / d l    = onehot(target) - p
  d entropy / d l = -p * (l - E_p[l]),
then into this chunk's slice of d weight and a running sum of d hidden. A chunk size that
does not divide V leaves a smaller last chunk, done once after the scan.

Numerics follow the full path (decoder.Transformer's LM head, then logprobs.token_logps):
the matmul in the hidden states' dtype, its result cast to float32, soft-capped when the model
caps its final logits (Gemma 2: cap * tanh(z / cap), whose derivative 1 - tanh^2 the backward
applies), then / temperature.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp


class TokenStats(NamedTuple):
    """Per position t ([B, T] float32): log p(target[t]), the predictive entropy, and whether
    the argmax (first of ties, as jnp.argmax) is the target (1.0 / 0.0; no gradient)."""

    logp: jax.Array
    entropy: jax.Array
    correct: jax.Array


def _chunk_logits(hidden, w, vocab_axis: int, temperature: float, softcap=None, with_slope: bool = False):
    """[B, T, C] float32 logits of one weight chunk ([C, D] for vocab_axis 0, [D, C] for 1);
    with_slope: also d logits / d z of the soft cap (None without one)."""
    contract = 1 - vocab_axis  # the weight's hidden-size axis
    z = jax.lax.dot_general(hidden, w, (((2,), (contract,)), ((), ()))).astype(jnp.float32)
    slope = None
    if softcap is not None:
        t = jnp.tanh(z / softcap)
        z, slope = softcap * t, 1.0 - t * t
    return (z / temperature, slope) if with_slope else z / temperature


def _weight_chunk(w, start, size: int, vocab_axis: int):
    return jax.lax.dynamic_slice_in_dim(w, start, size, axis=vocab_axis)


def _split(vocab: int, chunk: int) -> tuple[int, int]:
    """(full chunks, size of the last partial chunk; 0 when chunk divides vocab)."""
    return vocab // chunk, vocab % chunk


class _Running(NamedTuple):
    max: jax.Array  # running max logit
    sum: jax.Array  # sum exp(l - max)
    moment: jax.Array  # sum exp(l - max) * l
    picked: jax.Array  # the target's logit (0 until its chunk is seen)
    best: jax.Array  # top-1 logit so far
    best_id: jax.Array  # its vocabulary id


def _absorb(r: _Running, logits, start, targets) -> _Running:
    """Running statistics after the chunk of `logits` [B, T, C] holding ids start..start+C-1."""
    C = logits.shape[-1]
    c_max = logits.max(-1)
    new_max = jnp.maximum(r.max, c_max)
    scale = jnp.exp(r.max - new_max)
    e = jnp.exp(logits - new_max[..., None])
    local = targets - start
    inside = (local >= 0) & (local < C)
    at = jnp.take_along_axis(logits, jnp.clip(local, 0, C - 1)[..., None], axis=-1)[..., 0]
    c_arg = jnp.argmax(logits, -1).astype(jnp.int32) + start
    # chunks come in increasing id order: a tie keeps the earlier (smaller) id, as argmax does
    better = c_max > r.best
    return _Running(
        max=new_max,
        sum=r.sum * scale + e.sum(-1),
        moment=r.moment * scale + (e * logits).sum(-1),
        picked=jnp.where(inside, at, r.picked),
        best=jnp.where(better, c_max, r.best),
        best_id=jnp.where(better, c_arg, r.best_id),
    )


def _forward(hidden, w, targets, chunk: int, vocab_axis: int, temperature: float, softcap=None):
    vocab = w.shape[vocab_axis]
    n, rest = _split(vocab, chunk)
    shape = targets.shape
    zeros = jnp.zeros(shape, jnp.float32)
    r = _Running(jnp.full(shape, -jnp.inf), zeros, zeros, zeros, jnp.full(shape, -jnp.inf), jnp.zeros(shape, jnp.int32))

    def body(r, k):
        start = k * chunk
        logits = _chunk_logits(hidden, _weight_chunk(w, start, chunk, vocab_axis), vocab_axis, temperature, softcap)
        return _absorb(r, logits, start, targets), None

    if n:
        r, _ = jax.lax.scan(body, r, jnp.arange(n, dtype=jnp.int32))
    if rest:
        start = n * chunk
        logits = _chunk_logits(hidden, _weight_chunk(w, start, rest, vocab_axis), vocab_axis, temperature, softcap)
        r = _absorb(r, logits, start, targets)
    log_z = r.max + jnp.log(r.sum)
    mean_logit = r.moment / r.sum
    stats = TokenStats(r.picked - log_z, log_z - mean_logit, (r.best_id == targets).astype(jnp.float32))
    return stats, (log_z, mean_logit)


@partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def chunked_token_stats(
    hidden, w, targets, chunk: int, vocab_axis: int, temperature: float = 1.0, softcap=None
) -> TokenStats:
    """TokenStats of `targets` [B, T] under logits hidden @ w / temperature, vocab chunk by
    chunk.

    Args:
      hidden: [B, T, D] final hidden states (after the final norm), in the compute dtype.
      w: the LM head in the compute dtype: [V, D] (a tied embedding, vocab_axis=0) or [D, V]
        (an untied lm_head kernel, vocab_axis=1).
      targets: [B, T] int token ids, the token each position predicts.
      chunk: vocabulary ids per step (> 0); the last chunk is smaller when it does not divide V.
      temperature: logits are divided by it (PPO's sampling temperature).
      softcap: the model's final-logit soft cap (DecoderConfig.final_logit_softcap), or None.
    """
    return _forward(hidden, w, targets, chunk, vocab_axis, temperature, softcap)[0]


def _fwd(hidden, w, targets, chunk, vocab_axis, temperature, softcap):
    stats, (log_z, mean_logit) = _forward(hidden, w, targets, chunk, vocab_axis, temperature, softcap)
    return stats, (hidden, w, targets, log_z, mean_logit)


def _bwd(chunk, vocab_axis, temperature, softcap, res, g):
    hidden, w, targets, log_z, mean_logit = res
    g_logp, g_ent = g.logp.astype(jnp.float32), g.entropy.astype(jnp.float32)
    vocab = w.shape[vocab_axis]
    n, rest = _split(vocab, chunk)

    def grads(start, size):
        """(d hidden [B, T, D] float32, d weight chunk) of ids start..start+size-1."""
        wk = _weight_chunk(w, start, size, vocab_axis)
        logits, slope = _chunk_logits(hidden, wk, vocab_axis, temperature, softcap, with_slope=True)
        p = jnp.exp(logits - log_z[..., None])
        d = -p * (g_logp[..., None] + g_ent[..., None] * (logits - mean_logit[..., None]))
        hit = (targets - start)[..., None] == jnp.arange(size, dtype=targets.dtype)
        d = d + jnp.where(hit, g_logp[..., None], 0.0)
        # through "/ temperature" and the float32 cast, back to the matmul's dtype (as autodiff
        # of the full path)
        d = d / temperature if slope is None else d * slope / temperature
        dz = d.astype(hidden.dtype)
        dh = jax.lax.dot_general(dz, wk, (((2,), (vocab_axis,)), ((), ())), preferred_element_type=jnp.float32)
        if vocab_axis == 0:  # [C, D]
            dw = jnp.einsum("btc,btd->cd", dz, hidden, preferred_element_type=jnp.float32)
        else:  # [D, C]
            dw = jnp.einsum("btd,btc->dc", hidden, dz, preferred_element_type=jnp.float32)
        return dh, dw.astype(w.dtype)

    def body(carry, k):
        dh_sum, dw_all = carry
        start = k * chunk
        dh, dw = grads(start, chunk)
        return (dh_sum + dh, jax.lax.dynamic_update_slice_in_dim(dw_all, dw, start, axis=vocab_axis)), None

    carry = (jnp.zeros(hidden.shape, jnp.float32), jnp.zeros_like(w))
    if n:
        carry, _ = jax.lax.scan(body, carry, jnp.arange(n, dtype=jnp.int32))
    dh_sum, dw_all = carry
    if rest:
        dh, dw = grads(n * chunk, rest)
        dh_sum = dh_sum + dh
        dw_all = jax.lax.dynamic_update_slice_in_dim(dw_all, dw, n * chunk, axis=vocab_axis)
    return dh_sum.astype(hidden.dtype), dw_all, None


chunked_token_stats.defvjp(_fwd, _bwd)


def next_token_stats(
    hidden, w, tokens, chunk: int, vocab_axis: int, temperature: float = 1.0, softcap=None
) -> TokenStats:
    """TokenStats aligned with `tokens` [B, T] like logprobs.token_logps: entry t is about
    tokens[t] as predicted from position t-1; entry 0 (nothing predicts it) is 0."""
    targets = jnp.concatenate([tokens[:, 1:], jnp.zeros_like(tokens[:, :1])], axis=1).astype(jnp.int32)
    stats = chunked_token_stats(hidden, w, targets, chunk, vocab_axis, temperature, softcap)
    return TokenStats(*(jnp.pad(s[:, :-1], ((0, 0), (1, 0))) for s in stats))
