"""Building a model for a layout, creating its (sharded) parameters and running it."""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from rlaif_jax import sharding as shd
from rlaif_jax.models.config import DecoderConfig
from rlaif_jax.models.decoder import Transformer


def build_model(
    cfg: DecoderConfig,
    lm_head: bool = True,
    scalar_heads: Sequence[str] = (),
    layout: Optional[shd.Layout] = None,
) -> Transformer:
    """The decoder for `cfg`, running on `layout`'s mesh with its rules (every activation
    constrained, params placed by `init_params`/`load_hf` with the same layout), or on one
    device without constraints when `layout` is None."""
    return Transformer(cfg, lm_head=lm_head, scalar_heads=tuple(scalar_heads), layout=layout)


def _dummy_inputs(batch: int = 1, length: int = 4):
    tokens = jnp.zeros((batch, length), jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
    return tokens, positions, jnp.ones((batch, length), jnp.int32)


def _unplaced(model: Transformer) -> Transformer:
    # init's forward pass on dummy inputs is dead code: it needs no activation constraints.
    return model.clone(layout=None)


def abstract_params(model: Transformer) -> Any:
    """Boxed (logically annotated) ShapeDtypeStructs of the params; costs no memory."""
    return jax.eval_shape(lambda: _unplaced(model).init(jax.random.key(0), *_dummy_inputs())["params"])


def param_shardings(model: Transformer) -> Any:
    """NamedShardings of the params (a tree like the params) under the model's layout."""
    if model.layout is None:
        raise ValueError("param_shardings needs a model built with a layout (build_model(..., layout=...))")
    return model.layout.param_shardings(abstract_params(model))


def init_params(model: Transformer, rng: jax.Array) -> Any:
    """Random params, created directly in their shards on the model's layout (a 70B model
    never exists whole on one device); on the default device without a layout."""

    def init(key):
        return nn.unbox(_unplaced(model).init(key, *_dummy_inputs())["params"])

    if model.layout is None:
        return jax.jit(init)(rng)
    return jax.jit(init, out_shardings=param_shardings(model))(rng)


def _mesh_size(x: Any) -> int:
    mesh = getattr(getattr(jax.typeof(x), "sharding", None), "mesh", None)
    return 1 if mesh is None or not mesh.shape else math.prod(mesh.shape.values())


def check_placement(model: Transformer, params: Any) -> None:
    """Raise if `params` sit on a multi-device mesh the model was not built for. Works on
    concrete arrays and on tracers (jit sees its inputs' mesh), so a model without a layout
    cannot silently drop the activation constraints of params placed on a mesh."""
    leaves = jax.tree.leaves(params)
    if not leaves:
        return
    leaf = max(leaves, key=_mesh_size)
    n = _mesh_size(leaf)
    if n <= 1:
        return
    mesh = jax.typeof(leaf).sharding.mesh
    if model.layout is None:
        raise ValueError(
            f"params are placed on a {n}-device mesh {dict(mesh.shape)} but the model was built "
            "without a layout, so its activations would not be sharded: build it with "
            "build_model(..., layout=sharding.Layout(mesh, rules))"
        )
    if dict(mesh.shape) != dict(model.layout.mesh.shape):
        raise ValueError(
            f"params are placed on mesh {dict(mesh.shape)} but the model was built for mesh "
            f"{dict(model.layout.mesh.shape)}"
        )


def apply(
    model: Transformer,
    params: Any,
    tokens: jax.Array,
    positions: Optional[jax.Array] = None,
    segment_ids: Optional[jax.Array] = None,
    **kw,
) -> dict:
    """model.apply with defaults for unpacked, unpadded input (positions 0..T-1, one
    segment). The model's layout (if any) constrains the activations. Call inside jit.

    Args:
      tokens: [batch, length] int token ids.
      positions, segment_ids: [batch, length] int; segment 0 is padding.
      **kw: passed to Transformer.__call__ (cache, cache_index) or model.apply (rngs).
    Returns:
      Transformer's output dict (logits [batch, length, vocab] float32, hidden, heads...).
    """
    check_placement(model, params)
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    if segment_ids is None:
        segment_ids = jnp.ones(tokens.shape, jnp.int32)
    return model.apply({"params": params}, tokens, positions, segment_ids, **kw)


def lm_head_weight(model: Transformer, params: Any) -> tuple[jax.Array, int]:
    """The LM head as the model applies it: (weight in the compute dtype, its vocabulary
    axis): the tied embedding [vocab, hidden] (axis 0) or the lm_head kernel [hidden, vocab]
    (axis 1)."""
    cfg = model.cfg
    if cfg.tie_word_embeddings:
        return params["embed"]["embedding"].astype(cfg.compute_dtype), 0
    return params["lm_head"]["kernel"].astype(cfg.compute_dtype), 1


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
