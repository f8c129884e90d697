"""The train state and the one compiled train step every objective shares."""

from __future__ import annotations

from typing import Any, Callable, Optional

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

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


def _mesh_of(params: Any) -> Optional[Mesh]:
    for x in jax.tree.leaves(params):
        s = getattr(x, "sharding", None)
        if isinstance(s, NamedSharding):
            return s.mesh
    return None


def initial_state_shardings(params, tx, seed: int, extra: Optional[dict] = None) -> Optional[TrainState]:
    """Where `init_state` puts each leaf of a fresh state for `params` (arrays or
    ShapeDtypeStructs) placed on a mesh: params as placed, every param-shaped optimizer
    leaf (moments) like its param, the rest (counts, step, RNG, extra) replicated. None
    when the params are on no mesh (one device): there is nothing to place."""
    mesh = _mesh_of(params)
    if mesh is None:
        return None
    rep = NamedSharding(mesh, P())
    param_sh = placed_shardings(params, mesh)
    shapes = jax.eval_shape(lambda p, e: create_state(p, tx, seed, e), params, extra)
    # tx.init's zeros depend on no input: left to XLA, jit replicates them on every chip
    # (a 7B model's AdamW moments, 50 GiB, on each of them).
    opt_sh = optax.tree_map_params(tx, lambda _, s: s, shapes.opt_state, param_sh, transform_non_params=lambda _: rep)
    return jax.tree.map(lambda _: rep, shapes).replace(params=param_sh, opt_state=opt_sh)


def init_state(params, tx, seed: int, extra: Optional[dict] = None) -> TrainState:
    """create_state(params, tx, seed, extra) on device, placed by initial_state_shardings:
    the optimizer state sharded like the params (ZeRO-3), not replicated. The values are
    create_state's; only their placement is chosen here."""
    out = initial_state_shardings(params, tx, seed, extra)
    create = lambda p, e: create_state(p, tx, seed, e)  # noqa: E731
    fn = jax.jit(create) if out is None else jax.jit(create, out_shardings=out)
    return fn(params, extra)


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


def batch_statistics(objective, model, params, batch: dict, ref_params: Any, grad_accum: int = 1) -> dict:
    """The scalars an objective needs from its whole step batch before any gradient (KTO's
    KL reference point): `objective.batch_statistics(model, params, batch, ref_params)` gives
    (sum, count) pairs; they are summed over the grad_accum micro-batches (rows i, i+k, ...,
    as the step splits them) and returned as {name: sum / count}, without gradient. The batch
    is a global array, so the sums already span every data-parallel shard. Empty when the
    objective has no batch_statistics."""
    fn = getattr(objective, "batch_statistics", None)
    if fn is None:
        return {}
    if grad_accum == 1:
        sums = fn(model, params, batch, ref_params)
    else:
        micro = jax.tree.map(lambda x: _split_rows(x, grad_accum), batch)
        one = lambda mb: fn(model, params, mb, ref_params)  # noqa: E731
        zeros = jax.tree.map(
            lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(one, jax.tree.map(lambda x: x[0], micro))
        )

        def body(carry, mb):
            return _tree_add(carry, one(mb)), None

        sums, _ = jax.lax.scan(body, zeros, micro)
    return {name: jax.lax.stop_gradient(s / jnp.maximum(c, 1e-9)) for name, (s, c) in sums.items()}


def _split_rows(x, grad_accum: int):
    """[B, ...] -> [grad_accum, B // grad_accum, ...]; micro-batch j holds rows j, j+k, ...,
    so each stays spread over every data shard."""
    if x.shape[0] % grad_accum:
        raise ValueError(f"batch of {x.shape[0]} rows does not split into {grad_accum} micro-batches")
    return x.reshape(x.shape[0] // grad_accum, grad_accum, *x.shape[1:]).swapaxes(0, 1)


def make_train_step(objective, model, tx, schedule, grad_accum: int = 1):
    """step(state, batch, ref_params) -> (state, metrics); pure, for jax.jit.

    With grad_accum = k the batch is split into k micro-batches (rows i, i+k, i+2k, ...,
    so each stays spread over every data shard) and their summed gradients applied once.
    An objective's batch_statistics (see `batch_statistics`) are taken over the whole step
    batch first and handed to every micro-batch's loss as extra batch entries, so such an
    objective, too, gets exactly the gradient of one large batch.
    A step whose loss or gradient norm is not finite leaves params and optimizer state
    unchanged and records its number in state.nonfinite_step.
    """

    def loss_fn(params, batch, ref_params, key):
        loss_sum, weight, metrics = objective.loss(model, params, batch, ref_params, key)
        return loss_sum, (weight, metrics)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def step(state: TrainState, batch: dict, ref_params: Any):
        rng = jax.random.wrap_key_data(state.rng)
        rng, key = jax.random.split(rng)
        stats = batch_statistics(objective, model, state.params, batch, ref_params, grad_accum)
        if grad_accum == 1:
            (loss_sum, (weight, metrics)), grads = grad_fn(state.params, {**batch, **stats}, ref_params, key)
        else:
            micro = jax.tree.map(lambda x: _split_rows(x, grad_accum), batch)

            def body(carry, xs):
                mb, k = xs
                mb = jax.tree.map(
                    lambda x: shd.constrain(model.layout, x, ("activation_batch",) + (None,) * (x.ndim - 1)), mb
                )
                (ls, (w, m)), g = grad_fn(state.params, {**mb, **stats}, ref_params, k)
                return _tree_add(carry, (ls, w, m, g)), None

            first = {**jax.tree.map(lambda x: x[0], micro), **stats}
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
        out = derived_metrics(objective, out)
        out.update(
            loss=loss,
            grad_norm=grad_norm,
            learning_rate=schedule(state.step),
            param_norm=optax.global_norm(state.params),
        )
        new_state = state.replace(
            step=state.step + 1,
            params=params,
            opt_state=opt_state,
            rng=jax.random.key_data(rng),
            nonfinite_step=record_nonfinite(state, finite),
        )
        return new_state, out

    return step


def derived_metrics(objective, means: dict) -> dict:
    """`means` plus what an objective derives from them (KTO's rewards/margins, a difference
    of two means over different rows, which no single (sum, count) pair gives)."""
    fn = getattr(objective, "derived_metrics", None)
    return {**means, **fn(means)} if fn is not None else means


def make_eval_step(objective, model):
    """eval(params, batch, ref_params) -> metric sums/counts (for averaging over batches).
    The objective gets rng None: no training-only noise (MoE router jitter)."""

    def evaluate(params, batch, ref_params):
        stats = batch_statistics(objective, model, params, batch, ref_params)
        loss_sum, weight, metrics = objective.loss(model, params, {**batch, **stats}, ref_params, None)
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
    """Shardings of a placed state (init_state's): each leaf as it is placed; scalars
    that are not on the mesh replicated."""
    return placed_shardings(state, mesh)


def batch_shardings(batch: Any, mesh: Mesh) -> Any:
    """Each array's leading (example) axis over the data axes, where they divide it.
    `batch` holds arrays or shape structs."""
    return jax.tree.map(lambda x: shd.fit_sharding(shd.batch_sharding(mesh, len(x.shape)), x.shape), batch)


def _jit_step(step_fn: Callable, state_sh: Any, batch_sh: Any, const_sh: tuple, mesh: Mesh):
    return jax.jit(
        step_fn,
        in_shardings=(state_sh, batch_sh, *const_sh),
        out_shardings=(state_sh, NamedSharding(mesh, P())),
        donate_argnums=(0,),
    )


def jit_step(step_fn: Callable, state: TrainState, batch: Any, mesh: Mesh, *consts: Any):
    """The jax.jit of step_fn(state, batch, *consts) -> (state, metrics) for a state and a
    batch shaped like these (arrays or sharded ShapeDtypeStructs): the state as placed (and
    donated), the batch over the data axes, each const (reference params) as placed, the
    metrics replicated. compile_step's program, and what scripts/aot_compile.py lowers."""
    return _jit_step(
        step_fn,
        state_shardings(state, mesh),
        batch_shardings(batch, mesh),
        tuple(placed_shardings(c, mesh) for c in consts),
        mesh,
    )


def compile_step(step_fn: Callable, state: TrainState, mesh: Mesh, *consts: Any) -> Callable:
    """step_fn(state, batch, *consts) -> (state, metrics), jitted as jit_step jits it (with
    `state`'s and the consts' placement), once per batch shape.

    Returns run(state, batch, *consts) -> (state, metrics).
    """
    st_sh = state_shardings(state, mesh)
    const_sh = tuple(placed_shardings(c, mesh) for c in consts)
    cache: dict = {}

    def run(state, batch, *args):
        key = tuple(sorted((k, v.shape) for k, v in batch.items()))
        if key not in cache:
            cache[key] = _jit_step(step_fn, st_sh, batch_shardings(batch, mesh), const_sh, mesh)
        return cache[key](state, batch, *args)

    return run
