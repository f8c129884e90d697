"""Rotary position embeddings with the scaling variants found in Llama-family checkpoints.

Frequencies follow the "rotate half" layout that HF Llama checkpoints use (q/k weights are
already permuted for it), so imported weights need no permutation.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from rlaif_jax.models.config import DecoderConfig


def _base_inv_freq(theta: float, dim: int) -> np.ndarray:
    return 1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim))


def static_inv_freq(cfg: DecoderConfig) -> tuple[np.ndarray, float]:
    """Inverse frequencies and the cos/sin scale for every rope type that does not depend on
    the sequence length. Computed in numpy at trace time: they are constants of the model."""
    dim = cfg.head_dim
    rs = cfg.rope_scaling_dict
    kind = cfg.rope_type
    inv = _base_inv_freq(cfg.rope_theta, dim)
    if kind in ("default", "dynamic"):
        return inv, 1.0
    if kind == "linear":
        return inv / rs["factor"], 1.0
    if kind == "llama3":
        factor = rs["factor"]
        low, high = rs["low_freq_factor"], rs["high_freq_factor"]
        old_ctx = rs["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        out = np.where(wavelen > old_ctx / low, inv / factor, inv)
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * out / factor + smooth * out
        medium = ~(wavelen < old_ctx / high) & ~(wavelen > old_ctx / low)
        return np.where(medium, smoothed, out).astype(np.float32), 1.0
    if kind == "yarn":
        return _yarn(cfg, inv)
    raise ValueError(f"unsupported rope type {kind!r}")


def _yarn(cfg: DecoderConfig, inv: np.ndarray) -> tuple[np.ndarray, float]:
    rs = cfg.rope_scaling_dict
    dim, base = cfg.head_dim, cfg.rope_theta
    orig = rs.get("original_max_position_embeddings") or cfg.max_position_embeddings
    factor = rs.get("factor") or cfg.max_position_embeddings / orig

    def mscale(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attn = rs.get("attention_factor")
    if attn is None:
        m, m_all = rs.get("mscale"), rs.get("mscale_all_dim")
        attn = mscale(factor, m) / mscale(factor, m_all) if (m and m_all) else mscale(factor)
    beta_fast = rs.get("beta_fast") or 32
    beta_slow = rs.get("beta_slow") or 1

    def corr_dim(rot):
        return dim * math.log(orig / (rot * 2 * math.pi)) / (2 * math.log(base))

    lo, hi = corr_dim(beta_fast), corr_dim(beta_slow)
    if rs.get("truncate", True):
        lo, hi = math.floor(lo), math.ceil(hi)
    lo, hi = max(lo, 0), min(hi, dim - 1)
    if lo == hi:
        hi += 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - lo) / (hi - lo), 0, 1)
    extrap = 1 - ramp
    pos_freqs = base ** (np.arange(0, dim, 2).astype(np.float32) / dim)
    inv_out = (1.0 / (factor * pos_freqs)) * (1 - extrap) + (1.0 / pos_freqs) * extrap
    return inv_out.astype(np.float32), float(attn)


def rope_cos_sin(cfg: DecoderConfig, positions: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """cos/sin tables of shape [batch, length, head_dim] for explicit integer positions."""
    inv, scale = static_inv_freq(cfg)
    inv = jnp.asarray(inv)
    if cfg.rope_type == "dynamic":
        # Dynamic NTK rescales the base once the longest position passes the trained context;
        # like HF, the rescale is decided by the largest position in the current call.
        rs = cfg.rope_scaling_dict
        dim, factor, max_pos = cfg.head_dim, rs["factor"], cfg.max_position_embeddings
        seq_len = jnp.maximum(jnp.max(positions) + 1, max_pos).astype(jnp.float32)
        base = cfg.rope_theta * ((factor * seq_len / max_pos) - (factor - 1)) ** (dim / (dim - 2))
        inv = 1.0 / (base ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))
    return _cos_sin(inv, scale, positions)


def local_rope_cos_sin(cfg: DecoderConfig, positions: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Gemma 3's sliding-window layers: plain RoPE with base `rope_local_theta` (the global
    layers' scaling does not apply to them)."""
    return _cos_sin(jnp.asarray(_base_inv_freq(cfg.rope_local_theta, cfg.head_dim)), 1.0, positions)


def _cos_sin(inv, scale: float, positions):
    freqs = positions.astype(jnp.float32)[..., None] * inv
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb) * scale, jnp.sin(emb) * scale


def apply_rope(x: jnp.ndarray, cos: jnp.ndarray, sin: jnp.ndarray) -> jnp.ndarray:
    """x: [batch, length, heads, head_dim]; cos/sin: [batch, length, head_dim]."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    return (x.astype(jnp.float32) * cos + rotated.astype(jnp.float32) * sin).astype(x.dtype)
