"""The KV cache's storage: how many slots it has and where each call's keys go.

Every slot stores its key's position and segment id beside the key and value, so attention
masks by what a slot holds, not by where it is. That is what lets a sliding-window model
(Mistral) keep a ring of `sliding_window` slots: token i of the sequence goes to slot
i % slots, RoPE is applied before caching (a slot needs no re-rotation), and the window
mask on the stored positions is exact whichever slot a key landed in.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rlaif_jax.models.config import DecoderConfig

CACHE_LOGICAL_AXES = {
    "k": ("layers", "activation_batch", None, "activation_kv_heads", None),
    "v": ("layers", "activation_batch", None, "activation_kv_heads", None),
    "pos": ("layers", "activation_batch", None),
    "seg": ("layers", "activation_batch", None),
}


def cache_slots(cfg: DecoderConfig, length: int) -> int:
    """Slots a cache for sequences of `length` (prompt + new tokens) needs: a sliding-window
    model never looks back further than its window, so min(length, sliding_window). A model
    whose full-attention layers sit between sliding ones (Gemma 2/3) keeps every slot."""
    window = cfg.uniform_window
    if window and window < length:
        return window
    return length


def is_ring(cfg: DecoderConfig, slots: int) -> bool:
    """Whether a cache of `slots` wraps (writes at index % slots): exactly when it is a window
    wide. A shorter one never fills (`cache_slots` gave the whole length) and a longer one is a
    plain cache."""
    return bool(cfg.uniform_window) and slots == cfg.uniform_window


def init_cache(cfg: DecoderConfig, batch: int, length: int, dtype=None) -> dict:
    """An empty KV cache for sequences of up to `length` tokens: [layers, batch, slots,
    kv_heads, head_dim] keys and values plus per-slot positions and segment ids (0 = empty,
    never attended); slots = `cache_slots(cfg, length)` (a ring of the window for a
    sliding-window model)."""
    dtype = dtype or cfg.compute_dtype
    slots = cache_slots(cfg, length)
    shape = (cfg.num_layers, batch, slots, cfg.num_kv_heads, cfg.head_dim)
    return {
        "k": jnp.zeros(shape, dtype),
        "v": jnp.zeros(shape, dtype),
        "pos": jnp.zeros((cfg.num_layers, batch, slots), jnp.int32),
        "seg": jnp.zeros((cfg.num_layers, batch, slots), jnp.int32),
    }


def _write_rows(cache: dict, new: dict, slots, row_write: str) -> dict:
    """Row b's one new entry at slot slots[b] (row_write: DecoderConfig.kv_row_write)."""
    how = row_write if row_write != "auto" else ("select" if jax.default_backend() == "tpu" else "scatter")
    if how == "scatter":
        b = jnp.arange(cache["k"].shape[0], dtype=jnp.int32)
        return {
            name: c.at[b, slots].set(new[name][:, 0].astype(c.dtype), indices_are_sorted=True, unique_indices=True)
            for name, c in cache.items()
        }
    hit = jnp.arange(cache["k"].shape[1], dtype=jnp.int32)[None, :] == slots[:, None]  # [B, S]
    out = {}
    for name, c in cache.items():
        h = hit.reshape(hit.shape + (1,) * (c.ndim - 2))
        out[name] = jnp.where(h, new[name].astype(c.dtype), c)
    return out


def write(cache: dict, k, v, positions, segment_ids, cache_index, ring: bool, row_write: str) -> dict:
    """One layer's cache ({k, v: [B, S, KV, D], pos, seg: [B, S]}) with a call's T tokens
    written at sequence indices [cache_index, cache_index + T): at those slots, or, in a ring,
    at index % S, keeping only the last S when T > S. A decode step (T = 1) may give one
    index per row (cache_index [B]: continuous batching's slots each at their own length),
    written as row_write says (DecoderConfig.kv_row_write)."""
    new = {"k": k, "v": v, "pos": positions, "seg": segment_ids}
    S, T = cache["k"].shape[1], k.shape[1]
    if T == 1 and jnp.ndim(cache_index) == 1:  # one decode step, each row at its own index
        slots = jnp.asarray(cache_index, jnp.int32) % S if ring else cache_index
        return _write_rows(cache, new, slots, row_write)
    if not ring:
        return {
            name: jax.lax.dynamic_update_slice_in_dim(c, new[name].astype(c.dtype), cache_index, axis=1)
            for name, c in cache.items()
        }
    if T == 1:  # a decode step: one slot, no scatter
        slot = jnp.asarray(cache_index, jnp.int32) % S
        return {
            name: jax.lax.dynamic_update_slice_in_dim(c, new[name].astype(c.dtype), slot, axis=1)
            for name, c in cache.items()
        }
    n = min(T, S)  # the earlier ones would be overwritten in this same call
    slots = (cache_index + T - n + jnp.arange(n, dtype=jnp.int32)) % S  # distinct: n <= S
    return {name: c.at[:, slots].set(new[name][:, T - n :].astype(c.dtype)) for name, c in cache.items()}
