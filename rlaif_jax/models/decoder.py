"""One Flax decoder for the Llama-style families: RMSNorm, RoPE, SwiGLU, grouped-query
attention, optional sliding window, tied or untied embeddings, optional scalar heads.

Attention masks are built from explicit positions and segment ids, so one code path covers
padded batches (segment 0 = padding), packed batches (segments 1..k) and KV-cache decoding
(the cache stores each slot's position and segment).
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from rlaif_jax.models.config import DecoderConfig
from rlaif_jax.models.rope import apply_rope, rope_cos_sin
from rlaif_jax.sharding import constrain

Array = jax.Array
# Scores of masked pairs. A finite value keeps rows with nothing to attend to (padding
# queries) finite instead of NaN; their outputs are never used.
_MASKED = -0.7 * float(jnp.finfo(jnp.float32).max)

BATCH_LENGTH_EMBED = ("activation_batch", "activation_length", "activation_embed")


def _init(cfg: DecoderConfig, axes: Sequence[str]):
    return nn.with_logical_partitioning(nn.initializers.normal(cfg.initializer_range), tuple(axes))


def _zeros(axes: Sequence[str]):
    return nn.with_logical_partitioning(nn.initializers.zeros_init(), tuple(axes))


class RMSNorm(nn.Module):
    eps: float
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, x: Array) -> Array:
        scale = self.param(
            "scale",
            nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",)),
            (x.shape[-1],),
            self.param_dtype,
        )
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        # HF casts back to the input dtype before the scale multiply; same here for parity.
        return scale.astype(self.dtype) * y.astype(self.dtype)


def Dense(features: tuple, axis: tuple, kernel_axes: tuple, cfg: DecoderConfig, use_bias: bool = False, *, name: str):
    """A DenseGeneral with logical axes on its kernel (and bias). Call inside a compact method."""
    return nn.DenseGeneral(
        features=features,
        axis=axis,
        use_bias=use_bias,
        dtype=cfg.compute_dtype,
        param_dtype=cfg.params_dtype,
        kernel_init=_init(cfg, kernel_axes),
        bias_init=_zeros(kernel_axes[len(axis):]),
        name=name,
    )


def attention_mask(q_pos, q_seg, k_pos, k_seg, sliding_window: Optional[int]) -> Array:
    """[batch, q_len, k_len] boolean: same segment, key not padding, causal, within window."""
    m = (q_seg[:, :, None] == k_seg[:, None, :]) & (k_seg[:, None, :] != 0)
    m &= k_pos[:, None, :] <= q_pos[:, :, None]
    if sliding_window:
        m &= (q_pos[:, :, None] - k_pos[:, None, :]) < sliding_window
    return m


class Attention(nn.Module):
    cfg: DecoderConfig

    @nn.compact
    def __call__(self, x, cos, sin, positions, segment_ids, cache=None, cache_index=None):
        cfg = self.cfg
        H, KV, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        bias = cfg.attention_bias
        q = Dense((H, D), (-1,), ("embed", "heads", "head_dim"), cfg, bias, name="q_proj")(x)
        k = Dense((KV, D), (-1,), ("embed", "kv_heads", "head_dim"), cfg, bias, name="k_proj")(x)
        v = Dense((KV, D), (-1,), ("embed", "kv_heads", "head_dim"), cfg, bias, name="v_proj")(x)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)

        if cache is not None:
            # Write this call's keys at [cache_index, cache_index + T) and attend over the
            # whole cache; empty slots carry segment 0 and are masked.
            idx = (0, cache_index, 0, 0)
            ck = jax.lax.dynamic_update_slice(cache["k"], k.astype(cache["k"].dtype), idx)
            cv = jax.lax.dynamic_update_slice(cache["v"], v.astype(cache["v"].dtype), idx)
            cpos = jax.lax.dynamic_update_slice(cache["pos"], positions, (0, cache_index))
            cseg = jax.lax.dynamic_update_slice(cache["seg"], segment_ids, (0, cache_index))
            cache = {"k": ck, "v": cv, "pos": cpos, "seg": cseg}
            k, v, k_pos, k_seg = ck.astype(q.dtype), cv.astype(q.dtype), cpos, cseg
        else:
            k_pos, k_seg = positions, segment_ids

        B, T = q.shape[:2]
        qg = q.reshape(B, T, KV, H // KV, D)
        scores = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32)
        scores = scores * (D**-0.5)
        mask = attention_mask(positions, segment_ids, k_pos, k_seg, cfg.sliding_window)
        scores = jnp.where(mask[:, None, None, :, :], scores, _MASKED)
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        out = jnp.einsum("bkgts,bskd->btkgd", probs, v).reshape(B, T, H, D)
        out = Dense((cfg.hidden_size,), (-2, -1), ("heads", "head_dim", "embed"), cfg, bias, name="o_proj")(out)
        return out, cache


class MLP(nn.Module):
    cfg: DecoderConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.cfg
        b = cfg.mlp_bias
        gate = Dense((cfg.intermediate_size,), (-1,), ("embed", "mlp"), cfg, b, name="gate_proj")(x)
        up = Dense((cfg.intermediate_size,), (-1,), ("embed", "mlp"), cfg, b, name="up_proj")(x)
        h = constrain(nn.silu(gate) * up, ("activation_batch", "activation_length", "activation_mlp"))
        return Dense((cfg.hidden_size,), (-1,), ("mlp", "embed"), cfg, b, name="down_proj")(h)


class Block(nn.Module):
    cfg: DecoderConfig

    @nn.compact
    def __call__(self, x, cache, cos, sin, positions, segment_ids, cache_index):
        cfg = self.cfg
        norm = lambda name: RMSNorm(cfg.rms_norm_eps, cfg.compute_dtype, cfg.params_dtype, name=name)
        h, cache = Attention(cfg, name="attn")(
            norm("input_norm")(x), cos, sin, positions, segment_ids, cache, cache_index
        )
        x = x + h
        x = x + MLP(cfg, name="mlp")(norm("post_attn_norm")(x))
        x = constrain(x, BATCH_LENGTH_EMBED)
        return x, cache


def _remat(block_cls, policy: str, scanned: bool):
    if policy == "none":
        return block_cls
    jax_policy = {
        "full": None,
        "dots": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
    }[policy]
    # Inside a scan, CSE across iterations cannot happen, so prevent_cse only costs speed.
    return nn.remat(block_cls, policy=jax_policy, prevent_cse=not scanned)


class Transformer(nn.Module):
    """Decoder-only LM. Returns a dict with `hidden` (after the final norm), `logits`
    (float32, when `lm_head`), one [batch, length] float32 array per name in `scalar_heads`
    (a value or reward per position), and `cache` (when a cache was given)."""

    cfg: DecoderConfig
    lm_head: bool = True
    scalar_heads: tuple = ()

    @nn.compact
    def __call__(
        self,
        tokens: Array,
        positions: Array,
        segment_ids: Array,
        cache: Optional[dict] = None,
        cache_index: Optional[Array] = None,
    ) -> dict:
        cfg = self.cfg
        embed = nn.Embed(
            cfg.vocab_size,
            cfg.hidden_size,
            dtype=cfg.compute_dtype,
            param_dtype=cfg.params_dtype,
            embedding_init=_init(cfg, ("vocab", "embed")),
            name="embed",
        )
        x = embed(tokens.astype(jnp.int32))
        x = constrain(x, BATCH_LENGTH_EMBED)
        cos, sin = rope_cos_sin(cfg, positions)
        cos, sin = cos.astype(cfg.compute_dtype), sin.astype(cfg.compute_dtype)
        if cache_index is None:
            cache_index = jnp.zeros((), jnp.int32)

        if cfg.scan_layers:
            scan = nn.scan(
                _remat(Block, cfg.remat_policy, scanned=True),
                variable_axes={"params": 0},
                split_rngs={"params": True},
                in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
                out_axes=0,
                length=cfg.num_layers,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )
            x, new_cache = scan(cfg, name="layers")(
                x, cache, cos, sin, positions, segment_ids, cache_index
            )
        else:
            block_cls = _remat(Block, cfg.remat_policy, scanned=False)
            caches = []
            for i in range(cfg.num_layers):
                layer_cache = None if cache is None else jax.tree.map(lambda c: c[i], cache)
                x, c = block_cls(cfg, name=f"layers_{i}")(
                    x, layer_cache, cos, sin, positions, segment_ids, cache_index
                )
                caches.append(c)
            new_cache = None if cache is None else jax.tree.map(lambda *c: jnp.stack(c), *caches)

        hidden = RMSNorm(cfg.rms_norm_eps, cfg.compute_dtype, cfg.params_dtype, name="final_norm")(x)
        out = {"hidden": hidden}
        if self.lm_head:
            if cfg.tie_word_embeddings:
                logits = embed.attend(hidden)
            else:
                logits = Dense((cfg.vocab_size,), (-1,), ("embed", "vocab"), cfg, name="lm_head")(hidden)
            out["logits"] = constrain(
                logits.astype(jnp.float32), ("activation_batch", "activation_length", "activation_vocab")
            )
        for head in self.scalar_heads:
            # Heads run in float32: they are tiny and their outputs feed losses directly.
            out[head] = nn.DenseGeneral(
                1,
                use_bias=False,  # as OpenRLHF and HF score heads; a bias cancels in Bradley-Terry
                dtype=jnp.float32,
                param_dtype=jnp.float32,
                kernel_init=nn.with_logical_partitioning(_scalar_head_init(cfg), ("embed", None)),
                name=f"{head}_head",
            )(hidden.astype(jnp.float32))[..., 0]
        if cache is not None:
            out["cache"] = new_cache
        return out


def _scalar_head_init(cfg: DecoderConfig):
    return nn.initializers.normal(1.0 / (cfg.hidden_size + 1) ** 0.5)


def init_scalar_head(cfg: DecoderConfig, rng: jax.Array, mesh=None) -> dict:
    """A fresh scalar head's params (for a reward/value model on a pretrained trunk),
    placed like the model would place it."""
    kernel = _scalar_head_init(cfg)(rng, (cfg.hidden_size, 1), jnp.float32)
    if mesh is not None:
        from rlaif_jax import sharding as shd

        kernel = jax.device_put(kernel, shd.logical_to_sharding(
            jax.sharding.PartitionSpec("embed", None), kernel, mesh, shd.logical_rules()))
    return {"kernel": kernel}


def init_cache(cfg: DecoderConfig, batch: int, length: int, dtype=None) -> dict:
    """An empty KV cache: [layers, batch, length, kv_heads, head_dim] keys and values plus
    per-slot positions and segment ids (0 = empty, never attended)."""
    dtype = dtype or cfg.compute_dtype
    shape = (cfg.num_layers, batch, length, cfg.num_kv_heads, cfg.head_dim)
    return {
        "k": jnp.zeros(shape, dtype),
        "v": jnp.zeros(shape, dtype),
        "pos": jnp.zeros((cfg.num_layers, batch, length), jnp.int32),
        "seg": jnp.zeros((cfg.num_layers, batch, length), jnp.int32),
    }


CACHE_LOGICAL_AXES = {
    "k": ("layers", "activation_batch", None, "activation_kv_heads", None),
    "v": ("layers", "activation_batch", None, "activation_kv_heads", None),
    "pos": ("layers", "activation_batch", None),
    "seg": ("layers", "activation_batch", None),
}
