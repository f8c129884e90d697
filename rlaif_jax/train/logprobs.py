"""Per-token and per-sequence log-probs of target tokens, from logits, or (a model with
`vocab_chunk_size`) from the final hidden states by vocabulary chunks (train.vocab_chunks).

Batches follow `rlaif_jax.data.pipeline.batches`: `loss_mask[t] == 1` iff tokens[t] is a
response token, predicted from logits[t-1]. Packed rows hold several sequences; the mask is
0 on every segment's first token, so no prediction crosses a segment boundary.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rlaif_jax.models.params import apply, lm_head_weight
from rlaif_jax.train.vocab_chunks import TokenStats, next_token_stats


def chunked(model) -> bool:
    """Whether the objectives take log-probs by vocabulary chunks for this model."""
    return bool(model.cfg.vocab_chunk_size) and model.lm_head


def lm_forward(model, params, tokens, positions, segment_ids, **kw) -> dict:
    """`apply` for log-probs: with vocabulary chunks the LM head is left out, so the output
    has `hidden` (and any scalar heads) but no [B, T, V] logits; otherwise as `apply`."""
    if chunked(model):
        model = model.clone(lm_head=False)
    return apply(model, params, tokens, positions, segment_ids, **kw)


def model_token_stats(model, params, out: dict, tokens, temperature: float = 1.0) -> TokenStats:
    """[B, T] TokenStats (log-prob, entropy, top-1 correct) of tokens[t] predicted at t-1,
    entry 0 zero, by vocabulary chunks from `lm_forward`'s output of a `chunked` model
    (logits / temperature). The full-logits path keeps its own functions (token_logps,
    entropy_and_accuracy, ppo.response_logps_and_entropy), unchanged."""
    w, axis = lm_head_weight(model, params)
    cfg = model.cfg
    return next_token_stats(out["hidden"], w, tokens, cfg.vocab_chunk_size, axis, temperature, cfg.final_logit_softcap)


def model_token_logps(model, params, out: dict, tokens) -> jax.Array:
    """`token_logps` from `lm_forward`'s output: by vocabulary chunks when `chunked(model)`,
    else token_logps(out["logits"], tokens) exactly."""
    if chunked(model):
        return model_token_stats(model, params, out, tokens).logp
    return token_logps(out["logits"], tokens)


def token_logps(logits: jax.Array, tokens: jax.Array) -> jax.Array:
    """[B, T] log p(tokens[t] | tokens[<t]); position 0 (nothing predicts it) is 0."""
    logits = logits[:, :-1].astype(jnp.float32)
    targets = tokens[:, 1:]
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    lp = picked - jax.nn.logsumexp(logits, axis=-1)
    return jnp.pad(lp, ((0, 0), (1, 0)))


def segment_sums(values: jax.Array, segment_ids: jax.Array, num_segments: int) -> jax.Array:
    """[B, T] values -> [B, num_segments] sums per packed segment (segment k in column k-1)."""
    onehot = segment_ids[..., None] == jnp.arange(1, num_segments + 1)[None, None, :]
    return jnp.einsum("bt,bts->bs", values, onehot.astype(values.dtype))


def sequence_logps(logits, tokens, loss_mask, average: bool = False) -> jax.Array:
    """[B] sum (or per-token mean) of response-token log-probs, one sequence per row."""
    lp = token_logps(logits, tokens) * loss_mask
    total = lp.sum(-1)
    if average:
        return total / jnp.maximum(loss_mask.sum(-1), 1.0)
    return total


def entropy_and_accuracy(logits, tokens, loss_mask) -> tuple[jax.Array, jax.Array]:
    """Sums over masked targets of the predictive entropy and of top-1 correctness."""
    logits = logits[:, :-1].astype(jnp.float32)
    mask = loss_mask[:, 1:]
    logp = jax.nn.log_softmax(logits, axis=-1)
    ent = -(jnp.exp(logp) * logp).sum(-1)
    correct = (jnp.argmax(logits, -1) == tokens[:, 1:]).astype(jnp.float32)
    return (ent * mask).sum(), (correct * mask).sum()
