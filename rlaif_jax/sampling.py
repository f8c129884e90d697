"""Batched generation: one KV-cache prefill plus a compiled `lax.while_loop` decode.

Prompts of different lengths are left-padded so every row's next token lands in the same
cache slot; padding carries segment id 0 and is never attended, and positions start at 0
at each row's first real token, so a row's output does not depend on its neighbours.
A sliding-window model's cache is a ring of `sliding_window` slots (models/kv_cache.py), and
each decode step reads only the cache's filled blocks (DecoderConfig.decode_block).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple, Sequence

import gin
import jax
import jax.numpy as jnp
import numpy as np

from rlaif_jax import sharding as shd
from rlaif_jax.models.decoder import Transformer
from rlaif_jax.models.kv_cache import CACHE_LOGICAL_AXES, init_cache
from rlaif_jax.models.params import check_placement


@gin.configurable
@dataclasses.dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 128
    # 0 means greedy decoding.
    temperature: float = 1.0
    top_p: float = 1.0
    # 0 disables top-k.
    top_k: int = 0
    eos_ids: tuple = ()
    pad_id: int = 0
    # Prompt lengths are rounded up to a multiple of this to bound recompilation.
    prompt_bucket: int = 16

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        object.__setattr__(self, "eos_ids", tuple(int(e) for e in self.eos_ids))


class SampleOutput(NamedTuple):
    """tokens [B, T] (pad_id after a row stops), lengths [B] (generated tokens including the
    EOS), logprobs [B, T] float32: log-prob of each token under the model's distribution at
    the sampling temperature (temperature 1 for greedy), before top-k/top-p filtering, i.e.
    what a forward pass over the same sequence gives; 0 after a row stops."""

    tokens: np.ndarray
    lengths: np.ndarray
    logprobs: np.ndarray


def filter_logits(logits: jax.Array, top_k: int, top_p: float) -> jax.Array:
    """Top-k then nucleus filtering on [B, V] float32 logits; removed entries get -inf."""
    neg = jnp.finfo(logits.dtype).min
    if top_k and top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, neg, logits)
    if top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        # Keep a token while the mass strictly before it is below top_p: the top token always
        # stays, and the smallest set reaching top_p is kept.
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        keep = mass_before < top_p
        cutoff = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < cutoff, neg, logits)
    return logits


def sample_step(logits: jax.Array, rng: jax.Array, sp: SamplingParams) -> tuple[jax.Array, jax.Array]:
    """(token [B], logprob [B]) from last-position logits [B, V]."""
    logits = logits.astype(jnp.float32)
    if sp.temperature == 0:
        token = jnp.argmax(logits, axis=-1)
        logp = jax.nn.log_softmax(logits, axis=-1)
    else:
        scaled = logits / sp.temperature
        logp = jax.nn.log_softmax(scaled, axis=-1)
        token = jax.random.categorical(rng, filter_logits(scaled, sp.top_k, sp.top_p), axis=-1)
    return token.astype(jnp.int32), jnp.take_along_axis(logp, token[:, None], axis=-1)[:, 0]


def _generate(model: Transformer, sp: SamplingParams, params, tokens, positions, segs, rng):
    """Pure (jit it): left-padded prompts tokens/positions/segs [B, P] -> out_tokens [B, T],
    lengths [B], logprobs [B, T] (T = sp.max_new_tokens), on the model's layout."""
    cfg = model.cfg
    B, P = tokens.shape
    T = sp.max_new_tokens
    check_placement(model, params)
    cache = init_cache(cfg, B, P + T)
    cache = {k: shd.constrain(model.layout, v, CACHE_LOGICAL_AXES[k]) for k, v in cache.items()}
    out = model.apply({"params": params}, tokens, positions, segs, cache=cache, cache_index=jnp.int32(0))
    rng, key = jax.random.split(rng)
    tok, lp = sample_step(out["logits"][:, -1], key, sp)
    eos = jnp.asarray(sp.eos_ids or (-1,), jnp.int32)
    next_pos = positions[:, -1] + 1

    out_tokens = jnp.full((B, T), sp.pad_id, jnp.int32).at[:, 0].set(tok)
    out_logps = jnp.zeros((B, T), jnp.float32).at[:, 0].set(lp)
    done = jnp.isin(tok, eos)
    lengths = jnp.ones((B,), jnp.int32)

    def cond(state):
        i, _, _, done, *_ = state
        return (i < T) & ~jnp.all(done)

    def body(state):
        i, cache, prev, done, rng, out_tokens, out_logps, lengths = state
        pos = (next_pos + i - 1)[:, None]
        o = model.apply({"params": params}, prev[:, None], pos, jnp.ones_like(pos), cache=cache, cache_index=P + i - 1)
        rng, key = jax.random.split(rng)
        tok, lp = sample_step(o["logits"][:, -1], key, sp)
        tok = jnp.where(done, sp.pad_id, tok)
        lp = jnp.where(done, 0.0, lp)
        out_tokens = jax.lax.dynamic_update_slice(out_tokens, tok[:, None], (0, i))
        out_logps = jax.lax.dynamic_update_slice(out_logps, lp[:, None], (0, i))
        lengths = lengths + (~done).astype(jnp.int32)
        done = done | jnp.isin(tok, eos)
        return i + 1, o["cache"], tok, done, rng, out_tokens, out_logps, lengths

    state = (jnp.int32(1), out["cache"], tok, done, rng, out_tokens, out_logps, lengths)
    state = jax.lax.while_loop(cond, body, state)
    _, _, _, _, _, out_tokens, out_logps, lengths = state
    return out_tokens, lengths, out_logps


@functools.lru_cache(maxsize=32)
def _compiled(model: Transformer, sp: SamplingParams):
    return jax.jit(functools.partial(_generate, model, sp))


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, bucket: int) -> tuple[np.ndarray, ...]:
    """tokens, positions, segment ids [B, P] for left-padded prompts."""
    if not prompts:
        raise ValueError("no prompts to generate from")
    lens = [len(p) for p in prompts]
    if min(lens) == 0:
        raise ValueError(f"prompt {lens.index(0)} is empty; every prompt needs at least one token (e.g. BOS)")
    P = -(-max(lens) // bucket) * bucket
    tokens = np.full((len(prompts), P), pad_id, np.int32)
    segs = np.zeros((len(prompts), P), np.int32)
    positions = np.zeros((len(prompts), P), np.int32)
    for i, p in enumerate(prompts):
        n = len(p)
        tokens[i, P - n :] = p
        segs[i, P - n :] = 1
        positions[i, P - n :] = np.arange(n)
    return tokens, positions, segs


def generate(
    model: Transformer,
    params: Any,
    prompts: Sequence[Sequence[int]],
    rng: jax.Array,
    sampling: SamplingParams,
) -> SampleOutput:
    """Sample completions for token-id prompts. Deterministic given `rng`. On a model built
    with a layout, the batch is split over (data, fsdp) and the cache's kv heads over tensor.

    Args:
      model: from `build_model`; its layout (if any) decides where the sampler runs.
      params: the model's params, placed as its layout places them.
      prompts: B lists of token ids, each non-empty (e.g. starting with BOS).
    Returns:
      SampleOutput with host arrays tokens [B, T], lengths [B], logprobs [B, T],
      T = sampling.max_new_tokens.
    """
    tokens, positions, segs = left_pad(prompts, sampling.pad_id, sampling.prompt_bucket)
    fn = _compiled(model, sampling)
    if model.layout is not None:
        tokens, positions, segs = shd.shard_batch((tokens, positions, segs), model.layout.mesh)
    out_tokens, lengths, logps = fn(params, tokens, positions, segs, rng)
    return SampleOutput(*(shd.to_host(x) for x in (out_tokens, lengths, logps)))
