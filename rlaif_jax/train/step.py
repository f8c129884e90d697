"""The train state and the one compiled train step every objective shares."""

from __future__ import annotations

from typing import Any, Callable, Optional

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from rlaif_jax import sharding as shd


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array  # raw uint32 key data: checkpointable as a plain array
    # First step whose loss or gradient was not finite (-1: none). Tracked on device so
    # the host checks it only when it logs or checkpoints, never per step.
    nonfinite_step: jax.Array
    # An objective's own state, checkpointed with the rest (PPO: {"kl_coef": scalar}).
    extra: dict = flax.struct.field(default_factory=dict)


def create_state(params, tx, seed: int, extra: Optional[dict] = None) -> TrainState:
    """A fresh state at step 0: `tx`'s initial optimizer state and the RNG of `seed`."""
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=tx.init(params),
        rng=jax.random.key_data(jax.random.key(seed)),
        nonfinite_step=jnp.full((), -1, jnp.int32),
        extra=dict(extra or {}),
    )


def update_if_finite(tx, grads, opt_state, params, loss):
    """One optimizer update, applied only when the loss and the gradient norm are finite.

    Returns (params, opt_state, finite, grad_norm): the updated params and optimizer state,
    or the given ones unchanged when `finite` (a bool scalar) is False.
    """
    grad_norm = optax.global_norm(grads)
    updates, new_opt = tx.update(grads, opt_state, params)
    new_params = optax.apply_updates(params, updates)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)  # noqa: E731
    return keep(new_params, params), keep(new_opt, opt_state), finite, grad_norm


def record_nonfinite(state: TrainState, finite) -> jax.Array:
    """state.nonfinite_step after a step (state.step) that was `finite` or not: the first
    bad step is kept."""
    return jnp.where(~finite & (state.nonfinite_step < 0), state.step, state.nonfinite_step)


def _tree_add(a, b):
    return jax.tree.map(jnp.add, a, b)


def make_train_step(objective, model, tx, schedule, grad_accum: int = 1, mesh: Optional[Mesh] = None):
    """step(state, batch, ref_params) -> (state, metrics); pure, for jax.jit.

    With grad_accum = k the batch is split into k micro-batches (rows i, i+k, i+2k, ...,
    so each stays spread over every data shard) and their summed gradients applied once.
    A step whose loss or gradient norm is not finite leaves params and optimizer state
    unchanged and records its number in state.nonfinite_step.
    """

    def loss_fn(params, batch, ref_params, key):
        loss_sum, weight, metrics = objective.loss(model, params, batch, ref_params, key, mesh)
        return loss_sum, (weight, metrics)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def step(state: TrainState, batch: dict, ref_params: Any):
        rng = jax.random.wrap_key_data(state.rng)
        rng, key = jax.random.split(rng)
        if grad_accum == 1:
            (loss_sum, (weight, metrics)), grads = grad_fn(state.params, batch, ref_params, key)
        else:
            def split(x):
                if x.shape[0] % grad_accum:
                    raise ValueError(f"batch of {x.shape[0]} rows does not split into {grad_accum} micro-batches")
                return x.reshape(x.shape[0] // grad_accum, grad_accum, *x.shape[1:]).swapaxes(0, 1)

            micro = jax.tree.map(split, batch)

            def body(carry, xs):
                mb, k = xs
                mb = jax.tree.map(lambda x: shd.constrain(model.layout, x, ("activation_batch",) + (None,) * (x.ndim - 1)), mb)
                (ls, (w, m)), g = grad_fn(state.params, mb, ref_params, k)
                return _tree_add(carry, (ls, w, m, g)), None

            first = jax.tree.map(lambda x: x[0], micro)
            shapes = jax.eval_shape(grad_fn, state.params, first, ref_params, key)
            (ls0, (w0, m0)), g0 = shapes
            zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (ls0, w0, m0, g0))
            keys = jax.random.split(key, grad_accum)
            (loss_sum, weight, metrics, grads), _ = jax.lax.scan(body, zeros, (micro, keys))

        weight = jnp.maximum(weight, 1e-9)
        grads = jax.tree.map(lambda g: g / weight, grads)
        loss = loss_sum / weight
        params, opt_state, finite, grad_norm = update_if_finite(tx, grads, state.opt_state, state.params, loss)
        out = {name: s / jnp.maximum(c, 1e-9) for name, (s, c) in metrics.items()}
        out.update(loss=loss, grad_norm=grad_norm, learning_rate=schedule(state.step),
                   param_norm=optax.global_norm(state.params))
        new_state = state.replace(
            step=state.step + 1,
            params=params,
            opt_state=opt_state,
            rng=jax.random.key_data(rng),
            nonfinite_step=record_nonfinite(state, finite),
        )
        return new_state, out

    return step


def make_eval_step(objective, model, mesh: Optional[Mesh] = None):
    """eval(params, batch, ref_params) -> metric sums/counts (for averaging over batches).
    The objective gets rng None: no training-only noise (MoE router jitter)."""

    def evaluate(params, batch, ref_params):
        loss_sum, weight, metrics = objective.loss(model, params, batch, ref_params, None, mesh)
        metrics = dict(metrics, loss=(loss_sum, weight))
        return metrics

    return evaluate


def placed_shardings(tree: Any, mesh: Mesh) -> Any:
    """The NamedSharding of each placed array in `tree`; replicated for anything else
    (host scalars, single-device arrays). None stays None (an absent argument)."""
    rep = NamedSharding(mesh, P())

    def one(x):
        s = getattr(x, "sharding", None)
        return s if isinstance(s, NamedSharding) else rep

    return jax.tree.map(one, tree)


def state_shardings(state: TrainState, mesh: Mesh) -> Any:
    """Shardings of a state whose params are already placed: the optimizer state follows
    the params (XLA propagates it through tx.init); scalars are replicated."""
    return placed_shardings(state, mesh)


def batch_shardings(batch: Any, mesh: Mesh) -> Any:
    """Each array's leading (example) axis over the data axes, where they divide it.
    `batch` holds arrays or shape structs."""
    return jax.tree.map(lambda x: shd.fit_sharding(shd.batch_sharding(mesh, len(x.shape)), x.shape), batch)


def compile_step(step_fn: Callable, state: TrainState, mesh: Mesh, *consts: Any) -> Callable:
    """step_fn(state, batch, *consts) -> (state, metrics), jitted with explicit shardings:
    the state as placed (and donated), the batch over the data axes, each const (reference
    params) as placed, the metrics replicated. Compiled once per batch shape.

    Returns run(state, batch, *consts) -> (state, metrics).
    """
    st_sh = state_shardings(state, mesh)
    const_sh = tuple(placed_shardings(c, mesh) for c in consts)
    rep = NamedSharding(mesh, P())
    cache: dict = {}

    def run(state, batch, *args):
        key = tuple(sorted((k, v.shape) for k, v in batch.items()))
        if key not in cache:
            cache[key] = jax.jit(
                step_fn,
                in_shardings=(st_sh, batch_shardings(batch, mesh), *const_sh),
                out_shardings=(st_sh, rep),
                donate_argnums=(0,),
            )
        return cache[key](state, batch, *args)

    return run
