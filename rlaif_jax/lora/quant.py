"""The frozen base's kernels stored in int8 or 4-bit NF4 (QLoRA), dequantised in the matmul.

A kernel [*in, *out] is viewed as a matrix [n_in, n_out] (inputs flattened, outputs
flattened) and stored as
  int8: codes int8 [n_in, n_out] and one float32 scale per output column (absmax / 127),
  nf4:  two 4-bit indices into NF4_CODE per byte, uint8 [n_in / 2, n_out], and one float32
        absmax per block of `block` consecutive inputs of a column, [n_in / block, n_out]
        (QLoRA's blockwise absmax, without its double quantization of the absmaxes).
Blocks run along the input axis so that the codes and scales shard like the kernel's two
outer logical axes (embed / heads / mlp): a layer's weight is dequantised shard by shard.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

# NormalFloat4: the 16 levels of QLoRA (Dettmers et al. 2023, arXiv:2305.14314, appendix E),
# as bitsandbytes hard-codes them (csrc/kernels.cu dDequantizeNF4, functional.py).
NF4_CODE = np.array(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ],
    np.float32,
)
CODES, SCALE = "qcodes", "qscale"  # the param names that replace a quantized "kernel"


def _matrix(w: jax.Array, n_in: int) -> jax.Array:
    return w.reshape(int(np.prod(w.shape[:n_in])), -1).astype(jnp.float32)


def quantize(w: jax.Array, n_in: int, kind: str, block: int = 64) -> dict:
    """{CODES, SCALE} of kernel w (its first n_in axes are inputs)."""
    m = _matrix(w, n_in)
    if kind == "int8":
        scale = jnp.max(jnp.abs(m), axis=0, keepdims=True) / 127.0
        codes = jnp.round(m / jnp.where(scale == 0, 1.0, scale)).clip(-127, 127).astype(jnp.int8)
        return {CODES: codes, SCALE: scale}
    if kind != "nf4":
        raise ValueError(f"unknown quantization {kind!r}")
    n_in_flat, n_out = m.shape
    if n_in_flat % block:
        raise ValueError(f"nf4: {n_in_flat} inputs do not split into blocks of {block}")
    blocks = m.reshape(n_in_flat // block, block, n_out)
    absmax = jnp.max(jnp.abs(blocks), axis=1)
    x = blocks / jnp.where(absmax == 0, 1.0, absmax)[:, None, :]
    # Nearest level (as bitsandbytes' quantize_4bit): search the midpoints between levels.
    mids = jnp.asarray((NF4_CODE[1:] + NF4_CODE[:-1]) / 2)
    idx = jnp.searchsorted(mids, x.reshape(n_in_flat, n_out), side="left").astype(jnp.uint8)
    packed = (idx[0::2] << 4) | idx[1::2]  # the first of a pair in the high nibble, as bitsandbytes
    return {CODES: packed, SCALE: absmax}


def dequantize(q: dict, kind: str, shape: tuple, dtype, block: int = 64) -> jax.Array:
    """The kernel of `shape` (inputs first) in `dtype` from quantize's {CODES, SCALE}."""
    codes, scale = q[CODES], q[SCALE]
    if kind == "int8":
        m = codes.astype(jnp.float32) * scale
    else:
        hi, lo = codes >> 4, codes & 0xF
        idx = jnp.stack([hi, lo], axis=1).reshape(codes.shape[0] * 2, codes.shape[1])
        vals = jnp.asarray(NF4_CODE)[idx]
        m = (vals.reshape(-1, block, vals.shape[-1]) * scale[:, None, :]).reshape(vals.shape)
    return m.reshape(shape).astype(dtype)


def kind_of(q: dict) -> str:
    return "int8" if q[CODES].dtype == jnp.int8 else "nf4"


def block_of(q: dict) -> int:
    """The block size a stored nf4 kernel was quantized with (inputs / absmax rows)."""
    return q[CODES].shape[0] * 2 // q[SCALE].shape[0]
