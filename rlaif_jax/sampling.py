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

from rlaif_jax import continuous_batching
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
    # Continuous batching (continuous_batching.py): decode this many rows at a time, a finished
    # row's slot taking the next prompt, when a call has more prompts than slots (one device).
    # The same samples as the static batch; 0 decodes every prompt of a call as one batch.
    # Needs rng_per_prompt.
    slots: int = 0
    # How a call's key reaches the rows. False: each decode step splits one key and draws the
    # whole batch with it, so a prompt's sample depends on the batch it was decoded with (the
    # draws every published miniature table was measured with). True: prompt i draws step t
    # with fold_in(fold_in(rng, i), t), independent of batching; continuous batching and
    # `generate_samples`' shared prefill give the static sampler's samples only in this mode.
    rng_per_prompt: bool = False

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if self.slots < 0:
            raise ValueError(f"slots must be >= 0 (0: one static batch), got {self.slots}")
        if self.slots and not self.rng_per_prompt:
            raise ValueError(
                f"slots={self.slots} (continuous batching) needs rng_per_prompt=True: with one key per "
                "step a prompt's sample would depend on which prompts share its batch"
            )
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


def _typed(rng: jax.Array) -> jax.Array:
    """A typed key array (legacy raw uint32 keys [..., 2] wrapped), so a key's shape is its
    batch shape."""
    if jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key):
        return rng
    return jax.random.wrap_key_data(rng)


def row_keys(rng: jax.Array, rows: int, offset=0) -> jax.Array:
    """Per-row keys [rows] from one key: row r's is fold_in(rng, offset + r), so a prompt's
    draws depend on its index in the call, never on the batch it was decoded with."""
    return jax.vmap(jax.random.fold_in, (None, 0))(rng, offset + jnp.arange(rows, dtype=jnp.uint32))


def sample_step(logits: jax.Array, rng: jax.Array, sp: SamplingParams) -> tuple[jax.Array, jax.Array]:
    """(token [B], logprob [B]) from last-position logits [B, V]. `rng`: one key per row
    ([B]: each row draws from its own), or one key for the whole batch."""
    logits = logits.astype(jnp.float32)
    if sp.temperature == 0:
        token = jnp.argmax(logits, axis=-1)
        logp = jax.nn.log_softmax(logits, axis=-1)
    else:
        scaled = logits / sp.temperature
        logp = jax.nn.log_softmax(scaled, axis=-1)
        filtered = filter_logits(scaled, sp.top_k, sp.top_p)
        if _typed(rng).ndim == 1:
            token = jax.vmap(lambda k, row: jax.random.categorical(k, row, axis=-1))(_typed(rng), filtered)
        else:
            token = jax.random.categorical(_typed(rng), filtered, axis=-1)
    return token.astype(jnp.int32), jnp.take_along_axis(logp, token[:, None], axis=-1)[:, 0]


def step_keys(keys: jax.Array, step) -> jax.Array:
    """Each row's key for decode step `step` (0 = the token after the prompt)."""
    return jax.vmap(jax.random.fold_in, (0, None))(keys, jnp.asarray(step, jnp.uint32))


def _prefill(model: Transformer, params, tokens, positions, segs, length: int):
    """The prompts' KV cache (room for `length` tokens) and their last-position logits."""
    B = tokens.shape[0]
    check_placement(model, params)
    cache = init_cache(model.cfg, B, length)
    cache = {k: shd.constrain(model.layout, v, CACHE_LOGICAL_AXES[k]) for k, v in cache.items()}
    out = model.apply({"params": params}, tokens, positions, segs, cache=cache, cache_index=jnp.int32(0))
    return out["cache"], out["logits"][:, -1]


def _next_key(sp: SamplingParams, rng: jax.Array, step) -> tuple[jax.Array, jax.Array]:
    """(carried key state, the key(s) step `step` draws with): per-row keys [B] folded with the
    step (rng_per_prompt), or the next split of one batch key."""
    if sp.rng_per_prompt:
        return rng, step_keys(rng, step)
    rng, key = jax.random.split(rng)
    return rng, key


def _decode(model: Transformer, sp: SamplingParams, params, cache, last_logits, next_pos, keys, P: int):
    """The while-loop decode from a filled cache (prompts in slots [0, P)) and the prompts'
    last logits [B, V]; next_pos [B]: each row's first new position; keys: per-row [B]
    (rng_per_prompt) or the batch's one key."""
    B = last_logits.shape[0]
    T = sp.max_new_tokens
    rng, key = _next_key(sp, keys, 0)
    tok, lp = sample_step(last_logits, key, sp)
    eos = jnp.asarray(sp.eos_ids or (-1,), jnp.int32)

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
        rng, key = _next_key(sp, rng, i)
        tok, lp = sample_step(o["logits"][:, -1], key, sp)
        tok = jnp.where(done, sp.pad_id, tok)
        lp = jnp.where(done, 0.0, lp)
        out_tokens = jax.lax.dynamic_update_slice(out_tokens, tok[:, None], (0, i))
        out_logps = jax.lax.dynamic_update_slice(out_logps, lp[:, None], (0, i))
        lengths = lengths + (~done).astype(jnp.int32)
        done = done | jnp.isin(tok, eos)
        return i + 1, o["cache"], tok, done, rng, out_tokens, out_logps, lengths

    state = (jnp.int32(1), cache, tok, done, rng, out_tokens, out_logps, lengths)
    state = jax.lax.while_loop(cond, body, state)
    _, _, _, _, _, out_tokens, out_logps, lengths = state
    return out_tokens, lengths, out_logps


def _generate(model: Transformer, sp: SamplingParams, params, tokens, positions, segs, rng):
    """Pure (jit it): left-padded prompts tokens/positions/segs [B, P] -> out_tokens [B, T],
    lengths [B], logprobs [B, T] (T = sp.max_new_tokens), on the model's layout. `rng`: one
    key (row r draws with `row_keys(rng, B)[r]`) or per-row keys [B]."""
    B, P = tokens.shape
    rng = _typed(rng)
    keys = rng if rng.ndim == 1 or not sp.rng_per_prompt else row_keys(rng, B)
    cache, last = _prefill(model, params, tokens, positions, segs, P + sp.max_new_tokens)
    return _decode(model, sp, params, cache, last, positions[:, -1] + 1, keys, P)


def _generate_shared(model: Transformer, sp: SamplingParams, params, tokens, positions, segs, rngs):
    """`_generate` of the same B prompts under each of K keys rngs [K], with one prefill: the
    prompts' cache is computed once and broadcast to the K x B rows (sample-major: row
    j * B + i is prompt i under rngs[j], drawing with `row_keys(rngs[j], B)[i]`, as
    `_generate(..., rngs[j])` row i does). -> out_tokens, lengths, logprobs [K * B, T]."""
    B, P = tokens.shape
    rngs = _typed(rngs)
    K = rngs.shape[0]
    keys = jax.vmap(lambda k: row_keys(k, B))(rngs).reshape(K * B)
    cache, last = _prefill(model, params, tokens, positions, segs, P + sp.max_new_tokens)
    tile = lambda x, axis: jnp.concatenate([x] * K, axis=axis)  # noqa: E731 - sample-major rows
    cache = {n: shd.constrain(model.layout, tile(c, 1), CACHE_LOGICAL_AXES[n]) for n, c in cache.items()}
    return _decode(model, sp, params, cache, tile(last, 0), tile(positions[:, -1] + 1, 0), keys, P)


@functools.lru_cache(maxsize=32)
def _compiled(model: Transformer, sp: SamplingParams):
    return jax.jit(functools.partial(_generate, model, sp))


@functools.lru_cache(maxsize=32)
def _compiled_shared(model: Transformer, sp: SamplingParams):
    return jax.jit(functools.partial(_generate_shared, model, sp))


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
    if sampling.slots and len(prompts) > sampling.slots and model.layout is None:
        return continuous_batching.generate_continuous(model, params, prompts, rng, sampling, sampling.slots)
    tokens, positions, segs = left_pad(prompts, sampling.pad_id, sampling.prompt_bucket)
    fn = _compiled(model, sampling)
    if model.layout is not None:
        tokens, positions, segs = shd.shard_batch((tokens, positions, segs), model.layout.mesh)
    out_tokens, lengths, logps = fn(params, tokens, positions, segs, rng)
    return SampleOutput(*(shd.to_host(x) for x in (out_tokens, lengths, logps)))


def generate_samples(
    model: Transformer,
    params: Any,
    prompts: Sequence[Sequence[int]],
    rngs: Sequence[jax.Array],
    sampling: SamplingParams,
) -> list[SampleOutput]:
    """K samples of every prompt with one prefill: the prompts' KV cache is computed once
    and broadcast to the K x B rows, which decode as one batch. Sample j is what
    `generate(model, params, prompts, rngs[j], sampling)` returns (the same tokens; float
    log-probs to rounding, the batch being K times larger), so a stage that sampled K times
    with K seeds gets the same samples from one call.

    Args:
      rngs: K keys, one per sample.
    Returns:
      K SampleOutputs, as `generate`'s.
    """
    if not len(rngs):
        raise ValueError("no keys: generate_samples needs one key per sample")
    if not sampling.rng_per_prompt:
        # One key per step for the whole batch: K x B rows under one prefill cannot draw what
        # K separate calls would, so the K calls are made (the same samples, no shared prefill).
        return [generate(model, params, prompts, k, sampling) for k in rngs]
    tokens, positions, segs = left_pad(prompts, sampling.pad_id, sampling.prompt_bucket)
    if model.layout is not None:
        tokens, positions, segs = shd.shard_batch((tokens, positions, segs), model.layout.mesh)
    keys = jnp.stack([_typed(jnp.asarray(k)) for k in rngs])
    out = _compiled_shared(model, sampling)(params, tokens, positions, segs, keys)
    toks, lengths, logps = (shd.to_host(x) for x in out)
    B = len(prompts)
    return [
        SampleOutput(toks[j * B : (j + 1) * B], lengths[j * B : (j + 1) * B], logps[j * B : (j + 1) * B])
        for j in range(len(rngs))
    ]
