"""Creating (sharded) parameters and running the model with the mesh's rules active."""

from __future__ import annotations

from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from rlaif_jax import sharding as shd
from rlaif_jax.models.config import DecoderConfig
from rlaif_jax.models.decoder import Transformer


def build_model(cfg: DecoderConfig, lm_head: bool = True, scalar_heads: Sequence[str] = ()) -> Transformer:
    return Transformer(cfg, lm_head=lm_head, scalar_heads=tuple(scalar_heads))


def _dummy_inputs(batch: int = 1, length: int = 4):
    tokens = jnp.zeros((batch, length), jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
    return tokens, positions, jnp.ones((batch, length), jnp.int32)


def abstract_params(model: Transformer) -> Any:
    """Boxed (logically annotated) ShapeDtypeStructs of the params; costs no memory."""
    return jax.eval_shape(lambda: model.init(jax.random.key(0), *_dummy_inputs())["params"])


def param_shardings(model: Transformer, mesh: Mesh, rules: Optional[Sequence] = None) -> Any:
    return shd.param_shardings(abstract_params(model), mesh, rules or shd.logical_rules())


def init_params(
    model: Transformer,
    rng: jax.Array,
    mesh: Optional[Mesh] = None,
    rules: Optional[Sequence] = None,
) -> Any:
    """Random params, created directly in their shards when a mesh is given (a 70B model
    never exists whole on one device)."""

    def init(key):
        return nn.unbox(model.init(key, *_dummy_inputs())["params"])

    if mesh is None:
        return jax.jit(init)(rng)
    out = param_shardings(model, mesh, rules)
    return jax.jit(init, out_shardings=out)(rng)


def apply(
    model: Transformer,
    params: Any,
    tokens: jax.Array,
    positions: Optional[jax.Array] = None,
    segment_ids: Optional[jax.Array] = None,
    mesh: Optional[Mesh] = None,
    rules: Optional[Sequence] = None,
    **kw,
) -> dict:
    """model.apply with defaults for unpacked, unpadded input (positions 0..T-1, one
    segment) and activation constraints active when a mesh is given. Call inside jit."""
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    if segment_ids is None:
        segment_ids = jnp.ones(tokens.shape, jnp.int32)
    with shd.mesh_rules(mesh, rules):
        return model.apply({"params": params}, tokens, positions, segment_ids, **kw)


def last_token_index(segment_ids: jax.Array) -> jax.Array:
    """Index of each row's last real (segment != 0) token; right-padded rows. Reward heads
    read the score there."""
    length = segment_ids.shape[1]
    idx = jnp.arange(length)[None, :]
    return jnp.max(jnp.where(segment_ids != 0, idx, -1), axis=1).clip(0)


def gather_last(values: jax.Array, segment_ids: jax.Array) -> jax.Array:
    """values [batch, length] -> [batch] at each row's last real token."""
    idx = last_token_index(segment_ids)
    return jnp.take_along_axis(values, idx[:, None], axis=1)[:, 0]
