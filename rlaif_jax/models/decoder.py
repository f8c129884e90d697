"""One Flax decoder for the Llama-style families: RMSNorm, RoPE, SwiGLU (or Mixtral's sparse
mixture of SwiGLU experts), grouped-query attention, optional sliding window, tied or untied
embeddings, optional scalar heads; and the family features of Qwen2/3 (q/k/v bias, q/k norms)
and Gemma 2/3 (GeGLU, (1 + w) norms around attention and MLP, scaled embeddings, logit soft
caps, sliding layers alternating with global ones, local and global RoPE bases).

Attention masks are built from explicit positions and segment ids, so one code path covers
padded batches (segment 0 = padding), packed batches (segments 1..k) and KV-cache decoding
(the cache stores each slot's position and segment).
"""

from __future__ import annotations

import logging
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import PartitionSpec as P

from rlaif_jax import errors
from rlaif_jax.models import kv_cache
from rlaif_jax.models.blocked_attention import blocked_attention
from rlaif_jax.models.config import DecoderConfig
from rlaif_jax.models.heads import head_param
from rlaif_jax.models.kv_cache import CACHE_LOGICAL_AXES, init_cache  # noqa: F401 - re-exported
from rlaif_jax.models.rope import apply_rope, local_rope_cos_sin, rope_cos_sin
from rlaif_jax.sharding import Layout, constrain

log = logging.getLogger(__name__)
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
    # Gemma: the weight is stored zero-centred and scales by (1 + w), in float32.
    plus_one: bool = False

    @nn.compact
    def __call__(self, x: Array) -> Array:
        init = nn.initializers.zeros_init() if self.plus_one else nn.initializers.ones_init()
        scale = self.param("scale", nn.with_logical_partitioning(init, ("norm",)), (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        if self.plus_one:  # as HF Gemma: the multiply in float32, then the cast
            return (y * (1.0 + scale.astype(jnp.float32))).astype(self.dtype)
        # HF casts back to the input dtype before the scale multiply; same here for parity.
        return scale.astype(self.dtype) * y.astype(self.dtype)


def softcap(x: Array, cap: Optional[float]) -> Array:
    """cap * tanh(x / cap) (Gemma 2's attention-score and final-logit caps); x when cap is None."""
    return x if cap is None else cap * jnp.tanh(x / cap)


def _no_window(window) -> bool:
    return window is None or (isinstance(window, (int, np.integer)) and window <= 0)


def Dense(features: tuple, axis: tuple, kernel_axes: tuple, cfg: DecoderConfig, use_bias: bool = False, *, name: str):
    """A DenseGeneral with logical axes on its kernel (and bias). Call inside a compact method."""
    return nn.DenseGeneral(
        features=features,
        axis=axis,
        use_bias=use_bias,
        dtype=cfg.compute_dtype,
        param_dtype=cfg.params_dtype,
        kernel_init=_init(cfg, kernel_axes),
        bias_init=_zeros(kernel_axes[len(axis) :]),
        name=name,
    )


def attention_mask(q_pos, q_seg, k_pos, k_seg, sliding_window: Optional[int]) -> Array:
    """[batch, q_len, k_len] boolean: same segment, key not padding, causal, within window
    (`sliding_window` may be traced: a layer's window inside the scan over layers)."""
    m = (q_seg[:, :, None] == k_seg[:, None, :]) & (k_seg[:, None, :] != 0)
    m &= k_pos[:, None, :] <= q_pos[:, :, None]
    if not _no_window(sliding_window):
        m &= (q_pos[:, :, None] - k_pos[:, None, :]) < sliding_window
    return m


def einsum_attention(q, k, v, q_pos, q_seg, k_pos, k_seg, sliding_window, *, scale=None, logit_softcap=None):
    """The reference kernel: q [B, T, H, D] against k/v [B, S, KV, D] (GQA: H // KV query
    heads per KV head) with the exact mask of `attention_mask`, a materialised float32
    [B, KV, H // KV, T, S] score tensor -> [B, T, H, D] in v's dtype. Scores are q.k * scale
    (default head_dim ** -0.5), then soft-capped (`softcap`) when logit_softcap is set."""
    B, T, H, D = q.shape
    KV = k.shape[2]
    qg = q.reshape(B, T, KV, H // KV, D)
    scores = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32)
    scores = softcap(scores * (D**-0.5 if scale is None else scale), logit_softcap)
    mask = attention_mask(q_pos, q_seg, k_pos, k_seg, sliding_window)
    scores = jnp.where(mask[:, None, None, :, :], scores, _MASKED)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return jnp.einsum("bkgts,bskd->btkgd", probs, v).reshape(B, T, H, D)


def filled_attention(
    q, cache: dict, q_pos, q_seg, filled, sliding_window, block: int, *, scale=None, logit_softcap=None
):
    """`einsum_attention` of q [B, T, H, D] over one layer's cache ({k, v: [B, S, KV, D],
    pos, seg: [B, S]}) that reads only slots [0, filled) (`filled` traced: every slot past it
    is empty): blocks of `block` slots with an online softmax, in a loop that stops at the
    last filled block. One compiled program serves every step, where a static slice of the
    filled part would recompile per length (or per bucket of lengths). A cache of at most
    `block` slots (or block 0) is read whole by `einsum_attention`.

    The last block starts at S - block when S is not a multiple of `block` (a dynamic slice
    must fit); the slots it shares with the block before are masked, not counted twice."""
    S = cache["k"].shape[1]
    kw = dict(scale=scale, logit_softcap=logit_softcap)
    if not block or S <= block:
        return einsum_attention(
            q, cache["k"], cache["v"], q_pos, q_seg, cache["pos"], cache["seg"], sliding_window, **kw
        )
    B, T, H, D = q.shape
    qk_scale = D**-0.5 if scale is None else scale
    KV = cache["k"].shape[2]
    qg = q.reshape(B, T, KV, H // KV, D)

    def step(b, carry):
        m, denom, acc = carry  # running max, softmax denominator, weighted values (float32)
        start = b * block
        first = jnp.minimum(start, S - block)
        kb, vb, pb, sb = (
            jax.lax.dynamic_slice_in_dim(cache[n], first, block, axis=1) for n in ("k", "v", "pos", "seg")
        )
        mask = attention_mask(q_pos, q_seg, pb, sb, sliding_window)
        mask &= (first + jnp.arange(block) >= start)[None, None, :]
        scores = jnp.einsum("btkgd,bskd->bkgts", qg, kb.astype(q.dtype), preferred_element_type=jnp.float32)
        scores = jnp.where(mask[:, None, None], softcap(scores * qk_scale, logit_softcap), _MASKED)
        m_new = jnp.maximum(m, scores.max(-1))
        p = jnp.where(mask[:, None, None], jnp.exp(scores - m_new[..., None]), 0.0)
        scale = jnp.exp(m - m_new)
        pv = jnp.einsum("bkgts,bskd->bkgtd", p.astype(q.dtype), vb.astype(q.dtype), preferred_element_type=jnp.float32)
        return m_new, denom * scale + p.sum(-1), acc * scale[..., None] + pv

    G = H // KV
    init = (
        jnp.full((B, KV, G, T), _MASKED, jnp.float32),
        jnp.zeros((B, KV, G, T), jnp.float32),
        jnp.zeros((B, KV, G, T, D), jnp.float32),
    )
    _, denom, acc = jax.lax.fori_loop(0, (filled + block - 1) // block, step, init)
    # A query with nothing to attend to (never a decode step's: it sees its own key) gets 0.
    out = acc / jnp.maximum(denom, jnp.finfo(jnp.float32).tiny)[..., None]
    return out.transpose(0, 3, 1, 2, 4).reshape(B, T, H, D).astype(q.dtype)


# -- attention kernels (DecoderConfig.attention_impl) -----------------------------------------

_BINDING = "DecoderConfig.attention_impl"
# Run the splash kernel in Pallas interpret mode (tests on CPU); off the TPU it is refused.
SPLASH_INTERPRET = False
# 'auto' on CPU runs 'blocked' from this length (einsum's [T, T] scores cost most there).
BLOCKED_MIN_LENGTH = 512


def _is_cuda() -> bool:
    if jax.default_backend() != "gpu":
        return False
    try:
        return "cuda" in str(jax.devices()[0].client.platform_version).lower()
    except Exception:  # noqa: BLE001 - no way to tell: assume CUDA, cuDNN will say otherwise
        return True


def platform(layout: Optional[Layout] = None) -> str:
    """The platform the model runs on: its layout mesh's devices' ("tpu", "gpu", "cpu"),
    which need not be the default backend's (a program compiled ahead of time for a TPU
    topology from a CPU host); the default backend without a layout."""
    if layout is None:
        return jax.default_backend()
    return layout.mesh.devices.flat[0].platform


def resolve_attention_impl(cfg: DecoderConfig, length: int, layout: Optional[Layout] = None) -> str:
    """The kernel `cfg.attention_impl` means on the model's platform (see `platform`) for a
    sequence of `length`: 'auto' is cudnn on an NVIDIA GPU in bf16/fp16, splash on TPU, blocked
    on CPU from BLOCKED_MIN_LENGTH tokens, else einsum. Splash tiles the sequence in blocks of 128: other
    lengths (the 4-token init, short batches) run einsum."""
    impl = cfg.attention_impl
    if impl == "splash" and length % 128:
        return "einsum"
    if impl != "auto":
        return impl
    backend = platform(layout)
    if backend == "tpu":
        return "splash" if length % 128 == 0 else "einsum"
    if (
        backend == "gpu"
        and cfg.attn_logit_softcap is None  # cuDNN has no soft cap: see fused_attention
        and _is_cuda()
        and cfg.compute_dtype in (jnp.bfloat16, jnp.float16)
        and cfg.head_dim % 8 == 0
        and cfg.head_dim <= 256
    ):
        return "cudnn"
    if backend == "cpu" and length >= BLOCKED_MIN_LENGTH:
        return "blocked"
    return "einsum"


def fused_attention(
    impl,
    q,
    k,
    v,
    positions,
    segment_ids,
    sliding_window,
    layout: Optional[Layout] = None,
    *,
    scale=None,
    logit_softcap=None,
):
    """Self-attention over one full sequence (no cache) with one of the fused kernels.
    q [B, T, H, D], k/v [B, T, KV, D] -> [B, T, H, D] in q's dtype. `layout`: the model's
    (splash runs per device under a mesh), None on one device. `scale` (default
    head_dim ** -0.5) and `logit_softcap` as in `einsum_attention`: splash caps in its kernel;
    cuDNN cannot, so a soft-capped model falls back to 'xla' (logged), and 'xla' with a cap is
    the einsum reference (jax.nn.dot_product_attention has no cap).

    'xla' masks with the exact mask of `attention_mask` (by positions). 'cudnn' and 'splash'
    mask causality and the window by index within the row and packing by segment id, which is
    the same mask when positions count up by one inside each segment (every batch this stack
    builds); queries of padding (segment 0) differ but their outputs are never used."""
    D = q.shape[-1]
    scale = D**-0.5 if scale is None else scale
    if impl == "cudnn" and logit_softcap is not None:
        _log_once(
            f"{_BINDING} = 'cudnn': cuDNN flash attention has no attention-logit soft cap "
            f"(this model's is {logit_softcap}); running 'xla' instead"
        )
        impl = "xla"
    if impl == "xla":
        if logit_softcap is not None:
            return einsum_attention(
                q,
                k,
                v,
                positions,
                segment_ids,
                positions,
                segment_ids,
                sliding_window,
                scale=scale,
                logit_softcap=logit_softcap,
            ).astype(q.dtype)
        mask = attention_mask(positions, segment_ids, positions, segment_ids, sliding_window)
        return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None], scale=scale, implementation="xla")
    if impl == "cudnn":
        if not _is_cuda():
            raise errors.ConfigError(
                f"{_BINDING} = 'cudnn' needs an NVIDIA GPU (cuDNN), but the backend is "
                f"{jax.default_backend()!r}; use 'auto', 'xla' or 'einsum'"
            )
        return _index_masked_sdpa(q, k, v, segment_ids, sliding_window, "cudnn", scale)
    if impl == "splash":
        return _splash(q, k, v, segment_ids, sliding_window, layout, scale, logit_softcap)
    if impl == "blocked":
        return blocked_attention(
            q, k, v, positions, segment_ids, positions, segment_ids, sliding_window, logit_softcap, scale=scale
        )
    raise errors.ConfigError(f"{_BINDING} = {impl!r}: not a fused kernel")  # checked in config


_LOGGED: set = set()


def _log_once(msg: str) -> None:
    if msg not in _LOGGED:
        _LOGGED.add(msg)
        log.warning(msg)


def _index_masked_sdpa(q, k, v, segment_ids, sliding_window, implementation, scale=None):
    """jax.nn.dot_product_attention with the kernel's own causal / left-window masks (by
    index: cuDNN skips the masked blocks) and the packing mask (same segment, key not padding)
    as a boolean [B, 1, T, T] mask, which cuDNN adds as a bias."""
    seg = (segment_ids[:, :, None] == segment_ids[:, None, :]) & (segment_ids[:, None, :] != 0)
    window = (sliding_window - 1, 0) if sliding_window else None
    return jax.nn.dot_product_attention(
        q,
        k,
        v,
        mask=seg[:, None],
        scale=q.shape[-1] ** -0.5 if scale is None else scale,
        is_causal=True,
        local_window_size=window,
        implementation=implementation,
    )


def _splash_block(T: int) -> int:
    for b in (512, 256, 128):
        if T % b == 0:
            return b
    raise ValueError(f"splash attention needs a sequence length that is a multiple of 128, got {T}")


def _splash_kernel(T: int, groups: int, sliding_window: Optional[int], interpret: bool, logit_softcap=None):
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    if sliding_window:
        one = sm.LocalMask((T, T), window_size=(sliding_window - 1, 0), offset=0)
    else:
        one = sm.CausalMask((T, T))
    b = _splash_block(T)
    blocks = sk.BlockSizes(
        block_q=b,
        block_kv=b,
        block_kv_compute=b,
        block_q_dkv=b,
        block_kv_dkv=b,
        block_kv_dkv_compute=b,
        block_q_dq=b,
        block_kv_dq=b,
    )
    # One kernel per KV head: its `groups` query heads share the single K/V head (MQA). Built
    # per trace (not cached): it holds arrays that would leak from one trace into the next.
    return sk.make_splash_mqa_single_device(
        sm.MultiHeadMask([one] * groups), block_sizes=blocks, interpret=interpret, attn_logits_soft_cap=logit_softcap
    )


def _splash(q, k, v, segment_ids, sliding_window, layout: Optional[Layout], scale=None, logit_softcap=None):
    if platform(layout) != "tpu" and not SPLASH_INTERPRET:
        raise errors.ConfigError(
            f"{_BINDING} = 'splash' needs a TPU (Pallas TPU kernel), but the model runs on "
            f"{platform(layout)!r}; use 'auto', 'xla' or 'einsum'"
        )
    from jax.experimental.pallas.ops.tpu.splash_attention.splash_attention_kernel import SegmentIds

    B, T, H, D = q.shape
    KV = k.shape[2]
    scale = D**-0.5 if scale is None else scale
    kernel = _splash_kernel(T, H // KV, sliding_window, bool(SPLASH_INTERPRET), logit_softcap)

    def local(q, k, v, seg):
        b = q.shape[0]
        qg = (q * jnp.asarray(scale, q.dtype)).reshape(b, T, KV, H // KV, D).transpose(0, 2, 3, 1, 4)
        kt, vt = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [b, KV, T, D]
        seg = seg.astype(jnp.int32)

        def one_row(qr, kr, vr, sr):  # [KV, G, T, D], [KV, T, D], [KV, T, D], [T]
            ids = SegmentIds(q=sr, kv=sr)
            return jax.vmap(lambda a, b_, c: kernel(a, b_, c, segment_ids=ids))(qr, kr, vr)

        out = jax.vmap(one_row)(qg, kt, vt, seg)  # [b, KV, G, T, D]
        return out.transpose(0, 3, 1, 2, 4).reshape(b, T, H, D).astype(q.dtype)

    if layout is None:
        return local(q, k, v, segment_ids)
    # The kernel is a custom call the partitioner cannot split: run it on each device's own
    # rows (batch over the axes it is split over; heads and length whole).
    rows = layout.spec(("activation_batch", None, None, None), q.shape)
    seg_spec = P(rows[0], None)
    # check_vma=False: the Pallas call does not declare how its output varies over the mesh.
    return jax.shard_map(
        local, mesh=layout.mesh, in_specs=(rows, rows, rows, seg_spec), out_specs=rows, check_vma=False
    )(q, k, v, segment_ids)


def layer_window(cfg: DecoderConfig, local):
    """The sliding window of one layer: `cfg.uniform_window` when every layer attends alike
    (local None); else the window for a sliding layer and none for a global one, `local` a
    Python bool (unscanned layers) or a traced one (the scan over layers: then a traced window
    that the full global layers never reach)."""
    if local is None:
        return cfg.uniform_window
    if isinstance(local, (bool, np.bool_)):
        return cfg.sliding_window if local else None
    return jnp.where(local, cfg.sliding_window, jnp.iinfo(jnp.int32).max)


class Attention(nn.Module):
    cfg: DecoderConfig
    layout: Optional[Layout] = None

    @nn.compact
    def __call__(self, x, cos, sin, positions, segment_ids, cache=None, cache_index=None, local=None):
        cfg = self.cfg
        H, KV, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        bias = cfg.qkv_bias
        q = Dense((H, D), (-1,), ("embed", "heads", "head_dim"), cfg, bias, name="q_proj")(x)
        k = Dense((KV, D), (-1,), ("embed", "kv_heads", "head_dim"), cfg, bias, name="k_proj")(x)
        v = Dense((KV, D), (-1,), ("embed", "kv_heads", "head_dim"), cfg, bias, name="v_proj")(x)
        if cfg.qk_norm:  # Qwen3 / Gemma 3: per head, before RoPE
            norm = lambda name: RMSNorm(cfg.rms_norm_eps, cfg.compute_dtype, cfg.params_dtype, cfg.is_gemma, name=name)
            q, k = norm("q_norm")(q), norm("k_norm")(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)

        B, T = q.shape[:2]
        o_proj = Dense(
            (cfg.hidden_size,), (-2, -1), ("heads", "head_dim", "embed"), cfg, cfg.attention_bias, name="o_proj"
        )
        if cache is not None:
            out, cache = self._cached(q, k, v, positions, segment_ids, cache, cache_index, local)
            return o_proj(out), cache
        return o_proj(self._full(q, k, v, positions, segment_ids, local)), cache

    def _full(self, q, k, v, positions, segment_ids, local):
        cfg = self.cfg
        impl = resolve_attention_impl(cfg, q.shape[1], self.layout)
        kw = dict(scale=cfg.attention_scale, logit_softcap=cfg.attn_logit_softcap)

        def run(window):
            if impl == "einsum":
                return einsum_attention(q, k, v, positions, segment_ids, positions, segment_ids, window, **kw)
            return fused_attention(impl, q, k, v, positions, segment_ids, window, self.layout, **kw)

        traced = local is not None and not isinstance(local, (bool, np.bool_))
        if traced and impl in ("cudnn", "splash"):
            # Their masks are static: a sliding and a global layer are two kernels, and the scan
            # over layers picks one per layer.
            return jax.lax.cond(local, lambda: run(cfg.sliding_window), lambda: run(None))
        return run(layer_window(cfg, local))

    def _cached(self, q, k, v, positions, segment_ids, cache, cache_index, local=None):
        """Attention of this call's T tokens (sequence indices [cache_index, cache_index + T))
        through the cache, and the cache with their keys written (`kv_cache.write`); empty
        slots carry segment 0 and are masked."""
        cfg = self.cfg
        T, S = q.shape[1], cache["k"].shape[1]
        window = layer_window(cfg, local)
        kw = dict(scale=cfg.attention_scale, logit_softcap=cfg.attn_logit_softcap)
        ring = kv_cache.is_ring(cfg, S)
        new = kv_cache.write(cache, k, v, positions, segment_ids, cache_index, ring, cfg.kv_row_write)
        if T == 1:
            # Written first: in a ring the slot overwritten held the key one window back,
            # which the window masks anyway.
            filled = jnp.minimum(jnp.max(cache_index) + 1, S)  # per-row indices: the furthest row
            out = filled_attention(q, new, positions, segment_ids, filled, window, cfg.decode_block, **kw)
            return out, new
        if ring:
            # Several tokens into a ring overwrite keys that this call's own earlier queries
            # still see: attend over the ring as it was plus this call's keys.
            keys = {
                n: jnp.concatenate([cache[n].astype(x.dtype), x], axis=1)
                for n, x in (("k", k), ("v", v), ("pos", positions), ("seg", segment_ids))
            }
        else:
            keys = {n: c.astype(q.dtype) if n in ("k", "v") else c for n, c in new.items()}
        out = einsum_attention(q, keys["k"], keys["v"], positions, segment_ids, keys["pos"], keys["seg"], window, **kw)
        return out, new


class MLP(nn.Module):
    cfg: DecoderConfig
    layout: Optional[Layout] = None

    @nn.compact
    def __call__(self, x):
        cfg = self.cfg
        b = cfg.mlp_bias
        # XLA:CPU runs the weight gradients of a [batch, length, embed] input (two contracted
        # dims) off its fast dot path, after a materialised transpose; with the tokens in one
        # dim the MLP's backward is ~30% faster there, bit-identical in float32 (not in bf16:
        # kept 3-D). Meshes keep the 3-D activations their sharding rules name. docs/experiments/
        # 2026-12-02-sft-step-on-cpu.md.
        lead = x.shape[:-1]
        flat = (
            len(lead) > 1
            and cfg.compute_dtype == jnp.float32
            and platform(self.layout) == "cpu"
            and (self.layout is None or self.layout.mesh.size == 1)
        )
        if flat:
            x = x.reshape(-1, x.shape[-1])
        gate = Dense((cfg.intermediate_size,), (-1,), ("embed", "mlp"), cfg, b, name="gate_proj")(x)
        up = Dense((cfg.intermediate_size,), (-1,), ("embed", "mlp"), cfg, b, name="up_proj")(x)
        h = _activation(cfg)(gate) * up
        if not flat:
            h = constrain(self.layout, h, ("activation_batch", "activation_length", "activation_mlp"))
        out = Dense((cfg.hidden_size,), (-1,), ("mlp", "embed"), cfg, b, name="down_proj")(h)
        return out.reshape(*lead, cfg.hidden_size) if flat else out


def _activation(cfg: DecoderConfig):
    if cfg.hidden_act == "gelu_pytorch_tanh":  # Gemma's GeGLU: the tanh approximation, as HF
        return lambda x: jax.nn.gelu(x, approximate=True)
    return nn.silu


# -- sparse mixture of experts (Mixtral) -----------------------------------------------------

MOE_MATMUL = "moe_expert_matmul"


def _dense_experts(x, gate, w_gate, w_up, w_down, layout: Optional[Layout]):
    """Every expert on every token, summed with gate [B, T, E] (zero off the top-k): the
    reference implementation, E / k times the FLOPs of the selected experts."""
    g = jnp.einsum("bth,ehf->btef", x, w_gate)
    u = jnp.einsum("bth,ehf->btef", x, w_up)
    h = constrain(layout, nn.silu(g) * u, ("activation_batch", "activation_length", None, "activation_mlp"))
    h = (h.astype(jnp.float32) * gate[..., None]).astype(x.dtype)
    return jnp.einsum("btef,efh->bth", h, w_down)


def _ragged_experts(x, top_w, top_i, w_gate, w_up, w_down):
    """Dropless: the B*T*k (token, expert) pairs sorted by expert, then one grouped matmul per
    projection (`lax.ragged_dot`: native on TPU and GPU; XLA:CPU emulates it densely), then
    unsorted and summed with the top-k weights. Works on the tokens it is given (one device's
    shard under a mesh)."""
    B, T, H = x.shape
    k, E = top_i.shape[-1], w_gate.shape[0]
    flat_e = top_i.reshape(-1)
    order = jnp.argsort(flat_e, stable=True)
    xs = x.reshape(B * T, H)[order // k]
    group_sizes = jnp.bincount(flat_e, length=E).astype(jnp.int32)
    # Named so remat "dots" saves them as it saves the dense MLP's matmuls (no batch dims).
    g = checkpoint_name(jax.lax.ragged_dot(xs, w_gate, group_sizes), MOE_MATMUL)
    u = checkpoint_name(jax.lax.ragged_dot(xs, w_up, group_sizes), MOE_MATMUL)
    ys = checkpoint_name(jax.lax.ragged_dot(nn.silu(g) * u, w_down, group_sizes), MOE_MATMUL)
    inverse = jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0], dtype=order.dtype))
    y = ys[inverse].reshape(B * T, k, H).astype(jnp.float32)
    out = jnp.einsum("nkh,nk->nh", y, top_w.reshape(B * T, k).astype(jnp.float32))
    return out.reshape(B, T, H)


def _ragged_experts_on_mesh(x, top_w, top_i, w_gate, w_up, w_down, layout: Optional[Layout]):
    """`_ragged_experts` on each device's own tokens (shard_map): sorting a batch that is
    split over (data, fsdp) would otherwise gather every token everywhere. Expert weights
    come in whole along embed (the fsdp all-gather every layer does anyway) and split along
    mlp over the axes `mlp` maps to (tensor), whose partial outputs are summed."""
    if layout is None:
        return _ragged_experts(x, top_w, top_i, w_gate, w_up, w_down).astype(x.dtype)
    tok = layout.spec(("activation_batch", "activation_length", None), x.shape)
    used = {a for axes in tok if axes for a in ((axes,) if isinstance(axes, str) else axes)}
    mlp = layout.spec(("mlp",), (w_gate.shape[2],))[0]
    mlp_axes = tuple(a for a in ((mlp,) if isinstance(mlp, str) else (mlp or ())) if a not in used)
    mlp = None if not mlp_axes else (mlp_axes[0] if len(mlp_axes) == 1 else mlp_axes)
    w_in, w_out = P(None, None, mlp), P(None, mlp, None)

    def local(x, top_w, top_i, w_gate, w_up, w_down):
        y = _ragged_experts(x, top_w, top_i, w_gate, w_up, w_down)
        return jax.lax.psum(y, mlp_axes) if mlp_axes else y

    y = jax.shard_map(local, mesh=layout.mesh, in_specs=(tok, tok, tok, w_in, w_in, w_out), out_specs=tok)(
        x, top_w, top_i, w_gate, w_up, w_down
    )
    return y.astype(x.dtype)


def route(probs: Array, k: int) -> tuple[Array, Array]:
    """The k most probable experts per token and their probabilities renormalised to sum
    to 1 (as HF Mixtral; ties go to the lower expert index)."""
    top_w, top_i = jax.lax.top_k(probs, k)
    return top_w / top_w.sum(-1, keepdims=True), top_i


def router_stats(probs: Array, top_i: Array, segment_ids: Array) -> dict:
    """One layer's sums over real (segment != 0) tokens for the load-balancing loss: top-k
    assignments per expert, router probabilities per expert, and the token count."""
    valid = (segment_ids != 0).astype(jnp.float32)
    assigned = jax.nn.one_hot(top_i, probs.shape[-1], dtype=jnp.float32).sum(-2)
    return {
        "tokens": jnp.einsum("bte,bt->e", assigned, valid),
        "probs": jnp.einsum("bte,bt->e", probs, valid),
        "rows": valid.sum(),
    }


def load_balancing_loss(stats: dict) -> Array:
    """HF's `load_balancing_loss_func` (Switch Transformer eq. 4-6) from `router_stats`
    summed over layers: num_experts * sum_e f_e * P_e, with f_e the fraction of top-k
    assignments and P_e the mean router probability of expert e, over every layer's real
    tokens."""
    rows = jnp.maximum(stats["rows"], 1.0)
    num_experts = stats["tokens"].shape[-1]
    return num_experts * jnp.sum((stats["tokens"] / rows) * (stats["probs"] / rows))


class MoE(nn.Module):
    """Mixtral's sparse MoE block: router (linear, no bias) -> softmax in float32 -> top-k ->
    top-k weights renormalised to sum to 1 -> their weighted sum of SwiGLU experts. Returns
    (output, router_stats or None)."""

    cfg: DecoderConfig
    layout: Optional[Layout] = None

    @nn.compact
    def __call__(self, x, segment_ids):
        cfg = self.cfg
        E, k, H, F = cfg.num_experts, cfg.num_experts_per_tok, cfg.hidden_size, cfg.intermediate_size
        if cfg.router_jitter_noise and self.has_rng("router"):
            j = cfg.router_jitter_noise
            noise = jax.random.uniform(self.make_rng("router"), x.shape, jnp.float32, 1.0 - j, 1.0 + j)
            x = (x * noise).astype(x.dtype)
        logits = Dense((E,), (-1,), ("embed", "expert"), cfg, name="router")(x)
        probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
        top_w, top_i = route(probs, k)

        def expert_param(name, axes, shape):
            w = self.param(name, _init(cfg, axes), shape, cfg.params_dtype)
            return w.astype(cfg.compute_dtype)

        w_gate = expert_param("gate_proj", ("expert", "embed", "mlp"), (E, H, F))
        w_up = expert_param("up_proj", ("expert", "embed", "mlp"), (E, H, F))
        w_down = expert_param("down_proj", ("expert", "mlp", "embed"), (E, F, H))
        if cfg.moe_impl == "dense":
            gate = (jax.nn.one_hot(top_i, E, dtype=jnp.float32) * top_w[..., None]).sum(-2)
            y = _dense_experts(x, gate, w_gate, w_up, w_down, self.layout)
        else:
            y = _ragged_experts_on_mesh(x, top_w, top_i, w_gate, w_up, w_down, self.layout)
        stats = router_stats(probs, top_i, segment_ids) if cfg.output_router_logits else None
        return y, stats


class Block(nn.Module):
    cfg: DecoderConfig
    layout: Optional[Layout] = None

    @nn.compact
    def __call__(self, x, cache, cos, sin, positions, segment_ids, cache_index, local=None):
        """`local`: whether this layer is a sliding-window one when layers differ (a traced
        bool under the scan over layers), else None. `cos`/`sin` are then pairs (global,
        local) of tables when the sliding layers have their own RoPE base (Gemma 3)."""
        cfg = self.cfg
        norm = lambda name: RMSNorm(cfg.rms_norm_eps, cfg.compute_dtype, cfg.params_dtype, cfg.is_gemma, name=name)
        if isinstance(cos, tuple):
            cos, sin = (jnp.where(local, a_local, a_global) for a_global, a_local in (cos, sin))
        h, cache = Attention(cfg, self.layout, name="attn")(
            norm("input_norm")(x), cos, sin, positions, segment_ids, cache, cache_index, local
        )
        if cfg.is_gemma:  # Gemma: norms after attention and the MLP too (HF's names in hf_io)
            x = x + norm("post_attn_norm")(h)
            h = norm("pre_mlp_norm")(x)
        else:
            x = x + h
            h = norm("post_attn_norm")(x)
        if cfg.is_moe:
            h, stats = MoE(cfg, self.layout, name="moe")(h, segment_ids)
        else:
            h, stats = MLP(cfg, self.layout, name="mlp")(h), None
        if cfg.is_gemma:
            h = norm("post_mlp_norm")(h)
        x = constrain(self.layout, x + h, BATCH_LENGTH_EMBED)
        return x, (cache, stats)


def _remat(block_cls, policy: str, scanned: bool, moe: bool = False):
    if policy == "none":
        return block_cls
    jax_policy = {
        "full": None,
        "dots": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
    }[policy]
    if moe and policy == "dots":  # ragged_dot is not a dot_general: save it by name
        jax_policy = jax.checkpoint_policies.save_from_both_policies(
            jax_policy, jax.checkpoint_policies.save_only_these_names(MOE_MATMUL)
        )
    # Inside a scan, CSE across iterations cannot happen, so prevent_cse only costs speed.
    return nn.remat(block_cls, policy=jax_policy, prevent_cse=not scanned)


class Transformer(nn.Module):
    """Decoder-only LM. Returns a dict with `hidden` (after the final norm), `logits`
    (float32, when `lm_head`), one [batch, length] float32 array per name in `scalar_heads`
    (a value or reward per position), `cache` (when a cache was given) and, for an MoE
    model with `output_router_logits`, `moe_aux_loss` (the router load-balancing loss over
    the real tokens, as HF's). Router jitter noise applies only when an rng stream named
    "router" is given (`rngs={"router": key}`: training).

    `layout` fixes where the model runs: with one, every activation is constrained to its
    mesh and rules (in every trace: a model cannot forget its mesh); None is one device, no
    constraints. Build it with `params.build_model`."""

    cfg: DecoderConfig
    lm_head: bool = True
    scalar_heads: tuple = ()
    layout: Optional[Layout] = None

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
        if cfg.is_gemma:  # HF rounds the scale to the embedding's dtype before the multiply
            x = x * jnp.asarray(cfg.hidden_size**0.5, x.dtype)
        x = constrain(self.layout, x, BATCH_LENGTH_EMBED)
        cos, sin = rope_cos_sin(cfg, positions)
        cos, sin = cos.astype(cfg.compute_dtype), sin.astype(cfg.compute_dtype)
        if cfg.rope_local_theta is not None:
            lcos, lsin = local_rope_cos_sin(cfg, positions)
            cos, sin = (cos, lcos.astype(cfg.compute_dtype)), (sin, lsin.astype(cfg.compute_dtype))
        local_layers = cfg.local_layers
        if cache_index is None:
            cache_index = jnp.zeros((), jnp.int32)

        if cfg.scan_layers:
            scan = nn.scan(
                _remat(Block, cfg.remat_policy, scanned=True, moe=cfg.is_moe),
                variable_axes={"params": 0},
                split_rngs={"params": True, "router": True},
                in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast, 0),
                out_axes=0,
                length=cfg.num_layers,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )
            local = None if local_layers is None else jnp.asarray(local_layers)
            x, (new_cache, stats) = scan(cfg, self.layout, name="layers")(
                x, cache, cos, sin, positions, segment_ids, cache_index, local
            )
        else:
            block_cls = _remat(Block, cfg.remat_policy, scanned=False, moe=cfg.is_moe)
            caches, layer_stats = [], []
            for i in range(cfg.num_layers):
                layer_cache = None if cache is None else jax.tree.map(lambda c: c[i], cache)
                local = None if local_layers is None else local_layers[i]
                x, (c, st) = block_cls(cfg, self.layout, name=f"layers_{i}")(
                    x, layer_cache, cos, sin, positions, segment_ids, cache_index, local
                )
                caches.append(c)
                layer_stats.append(st)
            new_cache = None if cache is None else jax.tree.map(lambda *c: jnp.stack(c), *caches)
            stats = jax.tree.map(lambda *s: jnp.stack(s), *layer_stats)

        hidden = RMSNorm(cfg.rms_norm_eps, cfg.compute_dtype, cfg.params_dtype, cfg.is_gemma, name="final_norm")(x)
        out = {"hidden": hidden}
        if self.lm_head:
            if cfg.tie_word_embeddings:
                logits = embed.attend(hidden)
            else:
                logits = Dense((cfg.vocab_size,), (-1,), ("embed", "vocab"), cfg, name="lm_head")(hidden)
            # Gemma 2's final cap in float32 (HF caps in the model dtype: closer to exact here).
            logits = softcap(logits.astype(jnp.float32), cfg.final_logit_softcap)
            out["logits"] = constrain(
                self.layout, logits, ("activation_batch", "activation_length", "activation_vocab")
            )
        for head in self.scalar_heads:
            # Heads run in float32: they are tiny and their outputs feed losses directly.
            out[head] = nn.DenseGeneral(
                1,
                use_bias=False,  # as OpenRLHF and HF score heads; a bias cancels in Bradley-Terry
                dtype=jnp.float32,
                param_dtype=jnp.float32,
                kernel_init=nn.with_logical_partitioning(_scalar_head_init(cfg), ("embed", None)),
                name=head_param(head),
            )(hidden.astype(jnp.float32))[..., 0]
        if cache is not None:
            out["cache"] = new_cache
        if stats is not None:
            out["moe_aux_loss"] = load_balancing_loss(jax.tree.map(lambda s: s.sum(0), stats))
        return out


def _scalar_head_init(cfg: DecoderConfig):
    return nn.initializers.normal(1.0 / (cfg.hidden_size + 1) ** 0.5)


def init_scalar_head(cfg: DecoderConfig, rng: jax.Array, layout: Optional[Layout] = None) -> dict:
    """A fresh scalar head's params (for a reward/value model on a pretrained trunk):
    {"kernel": [hidden_size, 1] float32}, placed as a model built with `layout` places it
    (None: the default device)."""
    kernel = _scalar_head_init(cfg)(rng, (cfg.hidden_size, 1), jnp.float32)
    if layout is not None:
        kernel = jax.device_put(kernel, layout.sharding(("embed", None), kernel.shape))
    return {"kernel": kernel}
