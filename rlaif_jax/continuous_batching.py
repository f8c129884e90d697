"""Continuous batching: a fixed number of decode slots, one compiled decode loop over them,
and the next prompts prefilled into the slots that finished, so a batch never idles until its
longest row ends (a long-tailed length distribution is where that matters).

Each slot decodes at its own length: its cache row holds its prompt left-padded to the
longest prompt's bucket in slots [0, P), and its step t writes slot P + t - 1
(`kv_cache.write` with one index per row). Prompt i draws step t with
fold_in(fold_in(rng, i), t), as `sampling.generate` does, so the outputs are the static
sampler's for the same key: the same tokens, log-probs to float rounding (a row's masked
padding differs).
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from rlaif_jax import sampling as smp  # a module object: sampling imports this module too
from rlaif_jax.models.decoder import Transformer
from rlaif_jax.models.kv_cache import init_cache


def _step_keys(keys, steps):
    return jax.vmap(jax.random.fold_in)(keys, steps.astype(jnp.uint32))


def _start(model: Transformer, sp: smp.SamplingParams, W: int, params, tokens, positions, segs, keys):
    """Prefill n prompts ([n, P]) into fresh cache rows of W slots; their first tokens."""
    cache, last = smp._prefill(model, params, tokens, positions, segs, W)
    tok, lp = smp.sample_step(last, _step_keys(keys, jnp.zeros(keys.shape, jnp.int32)), sp)
    return cache, tok, lp


def _insert(sp: smp.SamplingParams, state: dict, slots, cache, tok, lp, next_pos, keys, ids):
    """The started prompts into their slots (rows past the slots' count are dropped)."""
    T = sp.max_new_tokens
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


def _decode(model: Transformer, sp: smp.SamplingParams, P: int, params, state: dict, min_done):
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
        tok, lp = smp.sample_step(o["logits"][:, -1], _step_keys(s["keys"], step), sp)
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


@functools.lru_cache(maxsize=32)
def _programs(model: Transformer, sp: smp.SamplingParams, P: int, W: int):
    start = jax.jit(functools.partial(_start, model, sp, W))
    insert = jax.jit(functools.partial(_insert, sp), donate_argnums=(0,))
    decode = jax.jit(functools.partial(_decode, model, sp, P), donate_argnums=(1,))
    return start, insert, decode


def _empty_state(model: Transformer, sp: smp.SamplingParams, slots: int, W: int) -> dict:
    T = sp.max_new_tokens
    return {
        "cache": init_cache(model.cfg, slots, W),
        "prev": jnp.zeros((slots,), jnp.int32),
        "step": jnp.full((slots,), T, jnp.int32),
        "done": jnp.ones((slots,), bool),
        "keys": smp.row_keys(jax.random.key(0), slots),
        "next_pos": jnp.zeros((slots,), jnp.int32),
        "ids": jnp.full((slots,), -1, jnp.int32),
        "lengths": jnp.zeros((slots,), jnp.int32),
        "tokens": jnp.zeros((slots, T), jnp.int32),
        "logprobs": jnp.zeros((slots, T), jnp.float32),
    }


def generate_continuous(
    model: Transformer,
    params: Any,
    prompts: Sequence[Sequence[int]],
    rng: jax.Array,
    sampling: smp.SamplingParams,
    slots: int,
) -> smp.SampleOutput:
    """`sampling.generate`'s outputs (the same call, the same keys) with `slots` rows decoding
    at a time: a finished row's slot takes the next prompt. Single-device (no layout).
    `rng`: one key (prompt i draws with fold_in(rng, i)) or one key per prompt [B]."""
    if slots < 1:
        raise ValueError(f"slots must be >= 1, got {slots}")
    if model.layout is not None:
        raise ValueError("continuous batching runs on one device; use sampling.generate on a mesh")
    tokens, positions, segs = smp.left_pad(prompts, sampling.pad_id, sampling.prompt_bucket)
    B, P = tokens.shape
    T = sampling.max_new_tokens
    W = P + T
    rng = smp._typed(rng)
    keys = rng if rng.ndim == 1 else smp.row_keys(rng, B)
    start, insert, decode = _programs(model, sampling, P, W)
    state = _empty_state(model, sampling, slots, W)
    out_tokens = np.full((B, T), sampling.pad_id, np.int32)
    out_logps = np.zeros((B, T), np.float32)
    out_lengths = np.zeros((B,), np.int32)
    nxt = 0
    free = list(range(slots))
    live = 0
    while nxt < B or live:
        if free and nxt < B:
            n = min(len(free), B - nxt)
            # Prefill batches rounded up to a power of two (few compiles); the extra rows go to
            # slot index `slots`, which the insert drops.
            m = 1 << (n - 1).bit_length()
            idx = np.arange(nxt, nxt + n)
            pad = np.concatenate([idx, np.full(m - n, idx[0])])
            cache, tok, lp = start(params, tokens[pad], positions[pad], segs[pad], keys[pad])
            to = np.concatenate([free[:n], np.full(m - n, slots)]).astype(np.int32)
            state = insert(state, to, cache, tok, lp, positions[pad, -1] + 1, keys[pad], pad.astype(np.int32))
            free, nxt, live = free[n:], nxt + n, live + n
        # Return when a slot frees up while prompts wait, else when every live row is done.
        min_done = slots - live + 1 if nxt < B else slots
        state = decode(params, state, jnp.int32(min_done))
        done = np.asarray(state["done"])
        ids = np.asarray(state["ids"])
        finished = [s for s in range(slots) if done[s] and ids[s] >= 0]
        if finished:
            toks, lps, lens = (np.asarray(state[k]) for k in ("tokens", "logprobs", "lengths"))
            for s in finished:
                out_tokens[ids[s]], out_logps[ids[s]], out_lengths[ids[s]] = toks[s], lps[s], lens[s]
            state["ids"] = state["ids"].at[np.asarray(finished)].set(-1)
            free += finished
            live -= len(finished)
    return smp.SampleOutput(out_tokens, out_lengths, out_logps)
