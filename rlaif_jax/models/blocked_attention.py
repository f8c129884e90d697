"""Blocked causal attention for the CPU: the sequence in query blocks, each attending only to
the keys it can see (none after its last query, none before its first query's window), with
an online softmax over key blocks (flash-style), so neither the work nor the memory of the
[T, T] score matrix is paid for the half the causal mask removes.

The mask inside a block is `decoder.attention_mask`'s (positions, segment ids, window), so the
result is `einsum_attention`'s. Skipping blocks by index assumes what every batch this stack
builds holds (and the fused kernels assume too): inside a segment, positions count up with the
index, so a key after a query is never visible to it, nor one `sliding_window` or more indices
before it.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

# Masked scores: finite (see decoder._MASKED), so a row with nothing to attend to stays finite.
_MASKED = -0.7 * float(jnp.finfo(jnp.float32).max)


def _static_window(sliding_window) -> Optional[int]:
    """The window as a Python int when it is one (blocks before it are skipped), else None: no
    window, or a traced one (a layer's inside the scan over layers, mixed local/global)."""
    return sliding_window if isinstance(sliding_window, int) and sliding_window else None


def _mask(q_pos, q_seg, k_pos, k_seg, sliding_window):
    m = (q_seg[:, :, None] == k_seg[:, None, :]) & (k_seg[:, None, :] != 0)
    m &= k_pos[:, None, :] <= q_pos[:, :, None]
    if sliding_window is not None and not (isinstance(sliding_window, int) and sliding_window == 0):
        m &= (q_pos[:, :, None] - k_pos[:, None, :]) < sliding_window
    return m


def _scores(qb, kb, mask, scale: float, logit_softcap: Optional[float]):
    """qb [B, KV, G, t, D] . kb [B, KV, s, D] -> masked float32 scores [B, KV, G, t, s]."""
    s = jnp.einsum("bkgtd,bksd->bkgts", qb, kb, preferred_element_type=jnp.float32) * scale
    if logit_softcap:
        s = logit_softcap * jnp.tanh(s / logit_softcap)
    return jnp.where(mask[:, None, None], s, _MASKED)


def blocked_attention(
    q,
    k,
    v,
    q_pos,
    q_seg,
    k_pos,
    k_seg,
    sliding_window: Optional[int],
    logit_softcap: Optional[float] = None,
    block: int = 256,
    kv_block: int = 0,
    *,
    scale: Optional[float] = None,
):
    """Self-attention of q [B, T, H, D] over k/v [B, T, KV, D] (GQA) with `einsum_attention`'s
    mask, in query blocks of `block`; `kv_block` > 0 also splits each block's keys, combined
    with an online softmax (0: one softmax over the block's visible keys). `logit_softcap`:
    Gemma 2's tanh cap on the scaled scores; `scale`: the scores' factor (default head_dim **
    -0.5; Gemma's query_pre_attn_scalar sets another). -> [B, T, H, D] in v's dtype."""
    B, T, H, D = q.shape
    KV = k.shape[2]
    G = H // KV
    # Heads first, once: every block's products are then plain batched matmuls over (B, KV).
    qh = q.reshape(B, T, KV, G, D).transpose(0, 2, 3, 1, 4)
    kh, vh = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    scale = D**-0.5 if scale is None else scale
    window = _static_window(sliding_window)
    outs = []
    for qs in range(0, T, block):
        qe = min(qs + block, T)
        lo = max(0, qs - window + 1) if window else 0
        qb, qp, qsg = qh[:, :, :, qs:qe], q_pos[:, qs:qe], q_seg[:, qs:qe]
        if not kv_block or qe - lo <= kv_block:
            mask = _mask(qp, qsg, k_pos[:, lo:qe], k_seg[:, lo:qe], sliding_window)
            p = jax.nn.softmax(_scores(qb, kh[:, :, lo:qe], mask, scale, logit_softcap), axis=-1)
            outs.append(jnp.einsum("bkgts,bksd->bkgtd", p.astype(v.dtype), vh[:, :, lo:qe]))
            continue
        m = jnp.full((B, KV, G, qe - qs), _MASKED, jnp.float32)
        den = jnp.zeros((B, KV, G, qe - qs), jnp.float32)
        acc = jnp.zeros((B, KV, G, qe - qs, D), jnp.float32)
        for ks in range(lo, qe, kv_block):
            ke = min(ks + kv_block, qe)
            mask = _mask(qp, qsg, k_pos[:, ks:ke], k_seg[:, ks:ke], sliding_window)
            s = _scores(qb, kh[:, :, ks:ke], mask, scale, logit_softcap)
            m_new = jnp.maximum(m, s.max(-1))
            p = jnp.where(mask[:, None, None], jnp.exp(s - m_new[..., None]), 0.0)
            rescale = jnp.exp(m - m_new)
            pv = jnp.einsum("bkgts,bksd->bkgtd", p.astype(v.dtype), vh[:, :, ks:ke], preferred_element_type=jnp.float32)
            m, den, acc = m_new, den * rescale + p.sum(-1), acc * rescale[..., None] + pv
        outs.append((acc / jnp.maximum(den, jnp.finfo(jnp.float32).tiny)[..., None]).astype(v.dtype))
    out = jnp.concatenate(outs, axis=3) if len(outs) > 1 else outs[0]
    return out.transpose(0, 3, 1, 2, 4).reshape(B, T, H, D)
