"""LoRA adapters on the decoder's projections, without touching the decoder.

`LoraModel` wraps a built Transformer: its `apply` runs the model under a Flax method
interceptor that, for each targeted projection (a DenseGeneral named q/k/v/o/gate/up/down_proj
whose path matches LoraSettings.targets), adds scale * (x A) B to the projection's output.
A (inputs x rank) and B (rank x outputs) are ordinary params of that module ("lora_a",
"lora_b"), so nn.scan stacks them per layer like the kernel and a checkpoint or optimizer sees
them as any other leaf. The base weight is never merged per step: x W + s (x A) B costs
2 r (n_in + n_out) FLOPs a token more and no copy of W.

Adapters off = the same model applied to a tree without the lora leaves: the interceptor
finds no A/B and returns the projection unchanged. The DPO / PPO reference is the base tree
itself, with no second copy of the weights.

A kernel replaced by quantized codes (rlaif_jax.lora.quant: QLoRA) is dequantised by the
interceptor in the matmul; the projection's own DenseGeneral then never runs.

Sharding: A takes the base kernel's input logical axes, B its output axes, the rank axis
none (replicated). Under the same rules an adapter is split exactly like the kernel it wraps
(fsdp over embed, tensor over heads/kv_heads/mlp), so x A contracts over the axis x is already
laid out for, (x A) B produces the projection's own output sharding with no extra
collective, and the adapters' optimizer moments are sharded (ZeRO) for free. Replicating them
would cost little memory (a 7B model's rank-16 adapters on all seven projections are 40M
params), but would make every tensor-parallel projection all-gather its output.
"""

from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from rlaif_jax.lora import quant
from rlaif_jax.lora.settings import LoraSettings

LORA_A, LORA_B = "lora_a", "lora_b"
# The adapters' dropout stream. The decoder's nn.scan splits only the "params" and "router"
# streams per layer (any other stream is not seen inside the scanned layers), so dropout
# draws from "router", which only training steps provide (MoE jitter reads it too, in other
# modules: make_rng folds in each module's path).
DROPOUT_RNG = "router"
# Each projection's (input, output) logical axes, as decoder.py names its kernel's.
AXES = {
    "q_proj": (("embed",), ("heads", "head_dim")),
    "k_proj": (("embed",), ("kv_heads", "head_dim")),
    "v_proj": (("embed",), ("kv_heads", "head_dim")),
    "o_proj": (("heads", "head_dim"), ("embed",)),
    "gate_proj": (("embed",), ("mlp",)),
    "up_proj": (("embed",), ("mlp",)),
    "down_proj": (("mlp",), ("embed",)),
}


def _a_init(key, shape, dtype):
    # PEFT's default (kaiming_uniform with a = sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
    fan_in = 1
    for d in shape[:-1]:
        fan_in *= d
    return jax.random.uniform(key, shape, dtype, -1.0, 1.0) / jnp.sqrt(fan_in).astype(dtype)


def _contract(x, w, n: int):
    """x [..., *k] . w [*k, ...] over x's last n axes and w's first n."""
    return jax.lax.dot_general(x, w, ((tuple(range(x.ndim - n, x.ndim)), tuple(range(n))), ((), ())))


def _interceptor(settings: LoraSettings):
    def intercept(next_fun, args, kwargs, context):
        mod = context.module
        if (
            context.method_name != "__call__"
            or not isinstance(mod, nn.DenseGeneral)
            or not settings.targets_path("/".join(mod.path))
        ):
            return next_fun(*args, **kwargs)
        x = args[0]
        n_in = len(mod.axis)
        in_shape, out_shape = tuple(x.shape[-n_in:]), tuple(mod.features)
        dtype = mod.dtype or x.dtype
        if mod.has_variable("params", quant.CODES):
            q = {k: mod.get_variable("params", k) for k in (quant.CODES, quant.SCALE)}
            w = quant.dequantize(q, quant.kind_of(q), in_shape + out_shape, dtype, quant.block_of(q))
            y = _contract(x.astype(dtype), w, n_in)
            if mod.use_bias:
                y = y + mod.get_variable("params", "bias").astype(dtype)
        else:
            y = next_fun(*args, **kwargs)
        if not (mod.has_variable("params", LORA_A) or mod.is_initializing()):
            return y  # adapters off: the base projection
        in_axes, out_axes = AXES.get(mod.name, ((None,) * n_in, (None,) * len(out_shape)))
        a = mod.param(
            LORA_A,
            nn.with_logical_partitioning(_a_init, (*in_axes, None)),
            (*in_shape, settings.rank),
            mod.param_dtype,
        )
        b = mod.param(
            LORA_B,
            nn.with_logical_partitioning(nn.initializers.zeros_init(), (None, *out_axes)),
            (settings.rank, *out_shape),
            mod.param_dtype,
        )
        h = x.astype(dtype)
        if settings.dropout and mod.has_rng(DROPOUT_RNG):
            keep = jax.random.bernoulli(mod.make_rng(DROPOUT_RNG), 1.0 - settings.dropout, h.shape)
            h = jnp.where(keep, h / (1.0 - settings.dropout), 0).astype(dtype)
        delta = _contract(_contract(h, a.astype(dtype), n_in), b.astype(dtype), 1)
        return y + (settings.scale * delta).astype(y.dtype)

    return intercept


class LoraModel:
    """A Transformer that applies its LoRA adapters (and dequantises a QLoRA base) when the
    params carry them. Everything but `apply` / `clone` is the wrapped model's. `dropout_rng`:
    the key of a training step's adapter dropout (None: no dropout, as in evaluation)."""

    def __init__(self, model, settings: LoraSettings, dropout_rng: Optional[jax.Array] = None):
        self.model = model
        self.settings = settings
        self.dropout_rng = dropout_rng

    def __getattr__(self, name):
        return getattr(self.model, name)

    def with_dropout(self, rng: Optional[jax.Array]) -> "LoraModel":
        return LoraModel(self.model, self.settings, rng)

    def clone(self, **kw) -> "LoraModel":
        return LoraModel(self.model.clone(**kw), self.settings, self.dropout_rng)

    def apply(self, variables, *args, rngs=None, **kw):
        if self.dropout_rng is not None and self.settings.dropout:
            rngs = dict(rngs or {}, **{DROPOUT_RNG: self.dropout_rng})
        with nn.intercept_methods(_interceptor(self.settings)):
            return self.model.apply(variables, *args, rngs=rngs, **kw)

    def init(self, *args, **kw):
        with nn.intercept_methods(_interceptor(self.settings)):
            return self.model.init(*args, **kw)


# -- param trees: adapters, split and merge ---------------------------------------------------


def _dummy_inputs():
    tokens = jnp.zeros((1, 4), jnp.int32)
    return tokens, jnp.arange(4, dtype=jnp.int32)[None], jnp.ones((1, 4), jnp.int32)


def is_adapter(path: tuple) -> bool:
    return path[-1] in (LORA_A, LORA_B)


def select(tree: Any, keep) -> Any:
    """The nested dict of `tree`'s leaves whose key path (a tuple of str) satisfies keep;
    dicts left empty are dropped."""
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            sub = select(v, lambda p, k=k: keep((k, *p)))
            if sub:
                out[k] = sub
        elif keep((k,)):
            out[k] = v
    return out


def merge(a: Any, b: Any) -> Any:
    """The union of two nested dicts with disjoint leaves (no array is copied)."""
    out = dict(a)
    for k, v in b.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def abstract_adapters(model, settings: LoraSettings) -> Any:
    """Boxed (logically annotated) ShapeDtypeStructs of the adapters of `model`."""
    lm = LoraModel(model.clone(layout=None), settings)
    boxed = jax.eval_shape(lambda: lm.init(jax.random.key(0), *_dummy_inputs())["params"])
    return select(boxed, is_adapter)


def init_adapters(model, settings: LoraSettings, rng: jax.Array) -> Any:
    """Fresh adapters (A random, B zero) for `model`, placed as its layout places the
    kernels they wrap (see the module docstring). The base's own init is dead code XLA
    drops: only the adapters are computed."""
    lm = LoraModel(model.clone(layout=None), settings)

    def init(key):
        return select(nn.unbox(lm.init(key, *_dummy_inputs())["params"]), is_adapter)

    if model.layout is None:
        return jax.jit(init)(rng)
    return jax.jit(init, out_shardings=model.layout.param_shardings(abstract_adapters(model, settings)))(rng)


def merged_weights(params: Any, settings: LoraSettings) -> Any:
    """A plain param tree with every adapter folded into its kernel, W + s A B (float32
    accumulation, the kernel's dtype): what an HF export of the adapted model holds. A
    quantized kernel is dequantised first."""

    def fold(node, path):
        if not isinstance(node, dict):
            return node
        out = {k: fold(v, path + (k,)) for k, v in node.items() if k not in (LORA_A, LORA_B)}
        if quant.CODES in node:
            raise ValueError(f"{'/'.join(path)}: dequantize_base the tree before merging")
        if LORA_A in node:
            a, b, w = node[LORA_A], node[LORA_B], node["kernel"]
            scanned = a.ndim + b.ndim - 2 > w.ndim  # a stack of layers (nn.scan): one leading axis
            d = jax.vmap(_delta)(a, b) if scanned else _delta(a, b)
            out["kernel"] = (w.astype(jnp.float32) + settings.scale * d.reshape(w.shape)).astype(w.dtype)
        return out

    return fold(params, ())


def _delta(a, b):
    return jnp.tensordot(a.astype(jnp.float32), b.astype(jnp.float32), axes=1, precision=jax.lax.Precision.HIGHEST)


# -- QLoRA: the frozen base's targeted kernels quantized ---------------------------------------


def _targets(tree: Any, settings: LoraSettings, path=()):
    """(path, module dict) of every targeted projection holding a kernel or quantized codes."""
    for k, v in tree.items():
        if isinstance(v, dict):
            p = path + (k,)
            if ("kernel" in v or quant.CODES in v) and settings.targets_path("/".join(p)):
                yield p, v
            else:
                yield from _targets(v, settings, p)


def _replace(tree: Any, path: tuple, node: dict) -> Any:
    if len(path) == 1:
        return {**tree, path[0]: node}
    return {**tree, path[0]: _replace(tree[path[0]], path[1:], node)}


def quantize_base(params: Any, settings: LoraSettings, layout=None) -> Any:
    """`params` with each targeted projection's kernel replaced by settings.quantize codes
    and scales (rlaif_jax.lora.quant), placed on `layout` like the kernel's outer axes
    (a stacked [layers, ...] kernel is quantized layer by layer). Unchanged when quantize
    is "none". Abstract params (ShapeDtypeStructs) give the abstract quantized tree, placed."""
    if settings.quantize == "none":
        return params
    for path, node in list(_targets(params, settings)):
        in_axes, out_axes = AXES[path[-1]]
        w = node["kernel"]
        n_in = len(in_axes)
        scanned = w.ndim > len(in_axes) + len(out_axes)
        one = lambda k: quant.quantize(k, n_in, settings.quantize, settings.block_size)  # noqa: E731
        fn = jax.vmap(one) if scanned else one
        axes = (("layers",) if scanned else ()) + (in_axes[0], out_axes[0])
        shapes = jax.eval_shape(fn, w)
        out_sh = None if layout is None else {k: layout.sharding(axes, s.shape) for k, s in shapes.items()}
        if isinstance(w, jax.ShapeDtypeStruct):
            q = {k: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=out_sh and out_sh[k]) for k, s in shapes.items()}
        else:
            q = jax.jit(fn, out_shardings=out_sh)(w)
        rest = {k: v for k, v in node.items() if k != "kernel"}
        params = _replace(params, path, {**rest, **q})
    return params


def dequantize_base(params: Any, settings: LoraSettings, kernel_shapes: Any) -> Any:
    """The float tree back from quantize_base's, given the original kernels' shapes and
    dtypes (a tree like `params` with a ShapeDtypeStruct at each "kernel": abstract_params)."""
    for path, node in list(_targets(params, settings)):
        if quant.CODES not in node:
            continue
        ref = kernel_shapes
        for k in path:
            ref = ref[k]
        shape = ref["kernel"]
        q = {k: node[k] for k in (quant.CODES, quant.SCALE)}
        kind, block = quant.kind_of(q), None
        scanned = q[quant.CODES].ndim == 3
        if scanned:
            per = {k: v[0] for k, v in q.items()}
            block = quant.block_of(per)
            w = jax.vmap(lambda qq: quant.dequantize(qq, kind, shape.shape[1:], shape.dtype, block))(q)
        else:
            w = quant.dequantize(q, kind, shape.shape, shape.dtype, quant.block_of(q))
        rest = {k: v for k, v in node.items() if k not in q}
        params = _replace(params, path, {**rest, "kernel": w})
    return params
