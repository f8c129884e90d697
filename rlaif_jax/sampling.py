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
from typing import Any, NamedTuple, Optional, Sequence

import gin
import jax
import jax.numpy as jnp
import numpy as np

from rlaif_jax import sharding as shd
from rlaif_jax.models.decoder import Transformer
from rlaif_jax.models.kv_cache import CACHE_LOGICAL_AXES, cache_slots, init_cache
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
    # Continuous batching (generate_continuous): decode this many rows at a time, a finished
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
        return generate_continuous(model, params, prompts, rng, sampling, sampling.slots)
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
    if sampling.slots and model.layout is None:
        # One prefill per prompt feeding its K rows, inside continuous batching.
        B, K = len(prompts), len(rngs)
        per = jnp.stack([row_keys(_typed(jnp.asarray(k)), B) for k in rngs], axis=1)  # [B, K]
        out = generate_rows(
            model, params, prompts, np.repeat(np.arange(B), K), per.reshape(B * K), sampling, sampling.slots
        )
        return [SampleOutput(*(x.reshape((B, K) + x.shape[1:])[:, j] for x in out)) for j in range(K)]
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


# -- continuous batching -------------------------------------------------------------------
# Continuous batching: a fixed number of decode slots, one compiled decode loop over them,
# and the next prompts prefilled into the slots that finished, so a batch never idles until its
# longest row ends (a long-tailed length distribution is where that matters).
#
# Each slot decodes at its own length: its cache row holds its prompt left-padded to the
# longest prompt's bucket in slots [0, P), and its step t writes slot P + t - 1
# (`kv_cache.write` with one index per row). Prompt i draws step t with
# fold_in(fold_in(rng, i), t), as `sampling.generate` does, so the outputs are the static
# sampler's for the same key: the same tokens, log-probs to float rounding (a row's masked
# padding differs).


def _step_keys(keys, steps):
    return jax.vmap(jax.random.fold_in)(keys, steps.astype(jnp.uint32))


def _start_slots(model: Transformer, W: int, offset: int, params, tokens, positions, segs, src):
    """Prefill n prompts ([n, P']) once for the rows that sample them: row r takes prompt
    src[r]'s cache (at cache index `offset` of its W slots, empty around it) and last logits.
    One prefill feeds every row of the same prompt (the K samples of a prompt)."""
    # offset < 0: a ring cache, prefilled whole (W slots) at the call's layout.
    cache, last = _prefill(model, params, tokens, positions, segs, W if offset < 0 else tokens.shape[1])
    rows = {}
    for n, c in cache.items():
        r = c[:, src]  # [L, m, S, ...]
        if offset >= 0 and r.shape[2] != W:
            full = jnp.zeros(r.shape[:2] + (W,) + r.shape[3:], r.dtype)
            r = jax.lax.dynamic_update_slice_in_dim(full, r, offset, axis=2)
        rows[n] = r
    return rows, last[src]


def _insert_slots(sp: SamplingParams, state: dict, slots, cache, last, next_pos, keys, ids):
    """The started rows into their slots, each drawing its first token from its prompt's last
    logits with its key (rows whose slot is past the slots' count are dropped)."""
    T = sp.max_new_tokens
    tok, lp = sample_step(last, _step_keys(keys, jnp.zeros(keys.shape, jnp.int32)), sp)
    eos = jnp.asarray(sp.eos_ids or (-1,), jnp.int32)
    put = lambda x, v: x.at[slots].set(v, mode="drop")  # noqa: E731
    s = dict(state)
    s["cache"] = {n: c.at[:, slots].set(cache[n].astype(c.dtype), mode="drop") for n, c in state["cache"].items()}
    s["prev"] = put(state["prev"], tok)
    s["step"] = put(state["step"], jnp.ones_like(tok))
    s["done"] = put(state["done"], jnp.isin(tok, eos) | (T == 1))
    s["keys"] = put(state["keys"], keys)
    s["next_pos"] = put(state["next_pos"], next_pos)
    s["ids"] = put(state["ids"], ids)
    s["lengths"] = put(state["lengths"], jnp.ones_like(tok))
    first = jnp.full((tok.shape[0], T), sp.pad_id, jnp.int32).at[:, 0].set(tok)
    s["tokens"] = put(state["tokens"], first)
    s["logprobs"] = put(state["logprobs"], jnp.zeros((tok.shape[0], T), jnp.float32).at[:, 0].set(lp))
    return s


def _decode_slots(model: Transformer, sp: SamplingParams, P: int, params, state: dict, min_done):
    """Decode every live slot until at least `min_done` slots are done."""
    T = sp.max_new_tokens
    eos = jnp.asarray(sp.eos_ids or (-1,), jnp.int32)
    rows = jnp.arange(state["prev"].shape[0])

    def cond(s):
        return jnp.sum(s["done"]) < min_done

    def body(s):
        step, done = s["step"], s["done"]
        o = model.apply(
            {"params": params},
            s["prev"][:, None],
            (s["next_pos"] + step - 1)[:, None],
            jnp.ones((rows.shape[0], 1), jnp.int32),
            cache=s["cache"],
            cache_index=P + step - 1,
        )
        tok, lp = sample_step(o["logits"][:, -1], _step_keys(s["keys"], step), sp)
        col = jnp.minimum(step, T - 1)
        s = dict(s)
        s["cache"] = o["cache"]
        s["tokens"] = s["tokens"].at[rows, col].set(jnp.where(done, s["tokens"][rows, col], tok))
        s["logprobs"] = s["logprobs"].at[rows, col].set(jnp.where(done, s["logprobs"][rows, col], lp))
        s["lengths"] = s["lengths"] + (~done).astype(jnp.int32)
        s["prev"] = jnp.where(done, s["prev"], tok)
        s["step"] = jnp.where(done, step, step + 1)
        s["done"] = done | jnp.isin(tok, eos) | (step + 1 >= T)
        return s

    return jax.lax.while_loop(cond, body, state)


@functools.lru_cache(maxsize=64)
def _start_program(model: Transformer, W: int, offset: int):
    return jax.jit(functools.partial(_start_slots, model, W, offset))


@functools.lru_cache(maxsize=32)
def _insert_program(sp: SamplingParams):
    return jax.jit(functools.partial(_insert_slots, sp), donate_argnums=(0,))


@functools.lru_cache(maxsize=32)
def _decode_program(model: Transformer, sp: SamplingParams, P: int):
    return jax.jit(functools.partial(_decode_slots, model, sp, P), donate_argnums=(1,))


def _compact_slots(state: dict, keep):
    """The state of the slots `keep` only (in that order): the tail's live rows in fewer slots."""
    return {k: (jax.tree.map(lambda c: c[:, keep], v) if k == "cache" else v[keep]) for k, v in state.items()}


_compact_program = jax.jit(_compact_slots)


def _empty_slots(model: Transformer, sp: SamplingParams, slots: int, W: int) -> dict:
    T = sp.max_new_tokens
    return {
        "cache": init_cache(model.cfg, slots, W),
        "prev": jnp.zeros((slots,), jnp.int32),
        "step": jnp.full((slots,), T, jnp.int32),
        "done": jnp.ones((slots,), bool),
        "keys": row_keys(jax.random.key(0), slots),
        "next_pos": jnp.zeros((slots,), jnp.int32),
        "ids": jnp.full((slots,), -1, jnp.int32),
        "lengths": jnp.zeros((slots,), jnp.int32),
        "tokens": jnp.zeros((slots, T), jnp.int32),
        "logprobs": jnp.zeros((slots, T), jnp.float32),
    }


def _pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


def generate_rows(
    model: Transformer,
    params: Any,
    prompts: Sequence[Sequence[int]],
    row_prompt: Sequence[int],
    keys: jax.Array,
    sampling: SamplingParams,
    slots: int,
    refill: Optional[int] = None,
    min_slots: Optional[int] = None,
) -> SampleOutput:
    """Continuous batching of R rows, row r sampling prompt row_prompt[r] with its own key
    keys[r] ([R] typed keys; step t draws with fold_in(keys[r], t)): `slots` rows decode at a
    time in one compiled loop, and when `refill` slots have finished (or the rows left fit),
    the next rows are prefilled into them. Rows of the same prompt inserted together share one
    prefill (order rows prompt-major: the K samples of a prompt side by side), and a fill's
    prompts are padded to their own bucket, not the call's longest. Row r's output is what the
    static sampler gives a prompt drawing with keys[r]: the same tokens, log-probs to float
    rounding (a row's masked padding differs). Single-device (no layout).

    The tail (every row started) shrinks: once the live rows fit in half the slots they move
    into a program of half as many, down to `min_slots` (default slots // 4), so the last
    long rows do not pay for the idle slots' forward (one more decode program per halving)."""
    if slots < 1:
        raise ValueError(f"slots must be >= 1, got {slots}")
    if model.layout is not None:
        raise ValueError("continuous batching runs on one device; use sampling.generate on a mesh")
    tokens, positions, segs = left_pad(prompts, sampling.pad_id, sampling.prompt_bucket)
    lens = np.asarray([len(p) for p in prompts])
    row_prompt = np.asarray(row_prompt, np.int64)
    R = len(row_prompt)
    # Fewer rows than slots: no more slots than the rows' power of two (idle slots cost a
    # forward each step; the power of two bounds the programs compiled).
    slots = min(slots, _pow2(R))
    P = tokens.shape[1]
    T = sampling.max_new_tokens
    W = P + T
    ring = cache_slots(model.cfg, W) < W
    keys = _typed(keys)
    decode, insert = _decode_program(model, sampling, P), _insert_program(sampling)
    # Refill once a quarter of the slots is free: fewer prefill calls and host round trips than
    # refilling each slot as it frees, for a few idle slot-steps.
    refill = max(1, slots // 4) if refill is None else max(1, refill)
    min_slots = max(1, slots // 4) if min_slots is None else max(1, min(min_slots, slots))
    state, cur = _empty_slots(model, sampling, slots, W), slots
    out_tokens = np.full((R, T), sampling.pad_id, np.int32)
    out_logps = np.zeros((R, T), np.float32)
    out_lengths = np.zeros((R,), np.int32)
    nxt, live, free = 0, 0, list(range(slots))
    while nxt < R or live:
        if free and nxt < R:
            n = min(len(free), R - nxt)
            rows = np.arange(nxt, nxt + n)
            uniq, src = np.unique(row_prompt[rows], return_inverse=True)
            # The fill's prompts at their own bucket (a ring cache keeps the call's layout).
            Pf = P if ring else min(P, -(-int(lens[uniq].max()) // sampling.prompt_bucket) * sampling.prompt_bucket)
            u = np.concatenate([uniq, np.full(_pow2(len(uniq)) - len(uniq), uniq[0])])
            # Every fill starts `slots` rows (fixed shapes: one insert program); the rows past
            # n go to slot index `slots`, which the insert drops.
            pad = np.concatenate([rows, np.full(slots - n, rows[0])])
            srcp = np.concatenate([src, np.zeros(slots - n, src.dtype)]).astype(np.int32)
            to = np.concatenate([free[:n], np.full(slots - n, slots)]).astype(np.int32)
            # A ring cache is prefilled at the call's layout (offset -1: the whole W-slot ring).
            start = _start_program(model, W, -1 if ring else P - Pf)
            cache, last = start(params, tokens[u, P - Pf :], positions[u, P - Pf :], segs[u, P - Pf :], srcp)
            pr = row_prompt[pad]
            state = insert(state, to, cache, last, positions[pr, -1] + 1, keys[pad], pad.astype(np.int32))
            free, nxt, live = free[n:], nxt + n, live + n
        if nxt >= R:
            # The tail: the live rows into the fewest slots (a power of two, >= min_slots) that
            # hold them; the slots' order is free (each row carries its id, key and position).
            new = max(min_slots, _pow2(max(live, 1)))
            if new < cur:
                ids = np.asarray(state["ids"])
                keep = np.argsort(ids < 0, kind="stable")[:new].astype(np.int32)
                state, cur = _compact_program(state, keep), new
        # Return when `refill` slots are free while rows wait; in the tail when the live rows
        # fit in half the slots (while halving is allowed), else when every live row is done.
        if nxt < R:
            min_done = slots - live + min(refill, R - nxt, live)
        else:
            min_done = cur - cur // 2 if cur // 2 >= min_slots else cur
        state = decode(params, state, jnp.int32(min_done))
        done, ids = np.asarray(state["done"]), np.asarray(state["ids"])
        finished = [s for s in range(cur) if done[s] and ids[s] >= 0]
        if finished:
            toks, lps, lens_ = (np.asarray(state[k]) for k in ("tokens", "logprobs", "lengths"))
            for s in finished:
                out_tokens[ids[s]], out_logps[ids[s]], out_lengths[ids[s]] = toks[s], lps[s], lens_[s]
            state["ids"] = state["ids"].at[np.asarray(finished)].set(-1)
            free += finished
            live -= len(finished)
    return SampleOutput(out_tokens, out_lengths, out_logps)


def generate_continuous(
    model: Transformer,
    params: Any,
    prompts: Sequence[Sequence[int]],
    rng: jax.Array,
    sampling: SamplingParams,
    slots: int,
) -> SampleOutput:
    """`sampling.generate`'s outputs (the same call, the same keys) with `slots` rows decoding
    at a time: a finished row's slot takes the next prompt. Single-device (no layout).
    `rng`: one key (prompt i draws with fold_in(rng, i)) or one key per prompt [B]."""
    rng = _typed(rng)
    B = len(prompts)
    keys = rng if rng.ndim == 1 else row_keys(rng, B)
    return generate_rows(model, params, prompts, np.arange(B), keys, sampling, slots)
