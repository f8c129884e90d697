"""Device mesh, logical-axis rules and placement helpers.

Params and activations carry logical axis names (embed, mlp, heads, vocab, ...). One rule
table maps them onto the (data, fsdp, tensor) mesh, so changing parallelism is a config
change. A `Layout` (mesh + rules) is built where a run starts and given to the model, which
carries it into traced code: nothing traced reads gin or a global. A mesh axis that does
not divide a dimension is dropped for that dimension (with a log line) rather than failing:
tiny test models and odd vocab sizes still place.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any, Optional, Sequence

import flax.linen as nn
import gin
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

log = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis -> mesh axes. Batch is split over data *and* fsdp (ZeRO-3 style: fsdp shards
# params along embed and gathers them per layer); tensor splits heads and the MLP.
DEFAULT_RULES: tuple = (
    ("activation_batch", ("data", "fsdp")),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_mlp", "tensor"),
    ("activation_heads", "tensor"),
    ("activation_kv_heads", "tensor"),
    ("activation_vocab", "tensor"),
    ("layers", None),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("norm", None),
    # Mixture-of-experts weights [expert, embed, mlp]: the expert axis stays unsharded, so
    # every expert is split like a dense MLP (embed over fsdp, mlp over tensor), each device
    # holds 1/(fsdp*tensor) of all of them, and the dropless grouped matmul runs on each
    # device's own tokens after the usual per-layer fsdp gather (decoder.MoE). Sharding
    # experts instead (overrides [("expert", "fsdp"), ("embed", None)]) stores them that way
    # but still gathers them per layer: true expert parallelism needs an all-to-all token
    # exchange the model does not do.
    ("expert", None),
)


@gin.configurable
def make_mesh(
    data: int = -1,
    fsdp: int = 1,
    tensor: int = 1,
    devices: Optional[Sequence[Any]] = None,
) -> Mesh:
    """A (data, fsdp, tensor) mesh over all (or the given) devices; one size may be -1."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = [data, fsdp, tensor]
    if sizes.count(-1) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got data={data} fsdp={fsdp} tensor={tensor}")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"{len(devices)} devices do not split into mesh sizes {sizes}")
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices):
        raise ValueError(
            f"mesh data={sizes[0]} x fsdp={sizes[1]} x tensor={sizes[2]} = {math.prod(sizes)} "
            f"does not match {len(devices)} devices"
        )
    try:
        from jax.experimental import mesh_utils

        # Topology-aware order on TPU (tensor on the fastest links); plain order elsewhere.
        arr = mesh_utils.create_device_mesh(sizes, devices=devices)
    except Exception:  # pragma: no cover - non-TPU topologies mesh_utils cannot place
        arr = np.asarray(devices).reshape(sizes)
    return Mesh(arr, MESH_AXES)


def single_device_mesh() -> Mesh:
    # This process's first device: jax.devices()[0] belongs to process 0 on a multi-host slice.
    return make_mesh(1, 1, 1, devices=jax.local_devices()[:1])


@gin.configurable
def logical_rules(overrides: Sequence = ()) -> tuple:
    """The rule table, with (logical, mesh_axes) pairs in `overrides` taking precedence.
    Read at the edges only (run functions, stages, scripts) into a `Layout`."""
    over = {k: v for k, v in overrides}
    rules = [(k, over.pop(k, v)) for k, v in DEFAULT_RULES]
    return tuple(rules + list(over.items()))


def _fit_spec(spec: P, shape: Sequence[int], mesh: Mesh) -> P:
    """Drop mesh axes that do not evenly divide their dimension."""
    out = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        if axes is None:
            out.append(None)
            continue
        axes_t = (axes,) if isinstance(axes, str) else tuple(axes)
        kept = []
        for a in axes_t:
            if dim % (math.prod(mesh.shape[k] for k in kept) * mesh.shape[a]) == 0:
                kept.append(a)
            elif mesh.shape[a] > 1:
                log.info("dimension %d is not divisible by mesh axis %r; replicating it", dim, a)
        out.append(None if not kept else (kept[0] if len(kept) == 1 else tuple(kept)))
    return P(*out)


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Leading (batch) axis over data x fsdp, everything else replicated."""
    return NamedSharding(mesh, P(("data", "fsdp"), *([None] * (ndim - 1))))


def shard_batch(batch: Any, mesh: Mesh) -> Any:
    """Place a host batch on the mesh. On one process `batch` is the global batch; on many
    processes it is this process's slice, and the global array is assembled from all."""

    def one(x):
        x = np.asarray(x)
        sharding = batch_sharding(mesh, x.ndim)
        if jax.process_count() == 1:
            return jax.device_put(x, fit_sharding(sharding, x.shape))
        return jax.make_array_from_process_local_data(sharding, x)

    return jax.tree.map(one, batch)


def fit_sharding(sharding: NamedSharding, shape) -> NamedSharding:
    """The same sharding without mesh axes that do not divide `shape`."""
    return NamedSharding(sharding.mesh, _fit_spec(sharding.spec, shape, sharding.mesh))


@gin.configurable
def initialize_distributed(
    coordinator_address: Optional[str] = None,
    num_processes: Optional[int] = None,
    process_id: Optional[int] = None,
    local_device_ids: Optional[Sequence[int]] = None,
) -> None:
    """Multi-host start-up. On Cloud TPU all arguments are discovered automatically; on
    GPU/CPU clusters pass them (or set JAX_COORDINATOR_ADDRESS etc.). Safe to call twice."""
    if jax.distributed.is_initialized():
        return
    jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
        local_device_ids=local_device_ids,
    )


def _hashable(axes: Any) -> Any:
    return tuple(axes) if isinstance(axes, (list, tuple)) else axes


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where a model's params and activations live: a mesh and the logical-axis rule table.

    Built once at the edges (a run function, a stage, a script), where the rules are read
    from gin (`logical_rules()`), and handed to `build_model`: a model built with a layout
    always constrains its activations and places its params on `mesh`; traced code never
    reads a rule from anywhere else. Hashable, so models and compiled functions can key on it.
    """

    mesh: Mesh
    rules: tuple

    def __post_init__(self):
        if not isinstance(self.mesh, Mesh):
            raise TypeError(f"Layout needs a jax.sharding.Mesh, got {self.mesh!r} (no layout: pass None)")
        # Rules from gin arrive as lists; the layout is a static (hashed) jit argument.
        object.__setattr__(self, "rules", tuple((str(k), _hashable(v)) for k, v in self.rules))

    def spec(self, logical_axes: Sequence[Optional[str]], shape: Sequence[int]) -> P:
        """The mesh PartitionSpec of `logical_axes` under the rules, without mesh axes that
        do not divide their dimension of `shape`."""
        return _fit_spec(nn.logical_to_mesh_axes(tuple(logical_axes), self.rules), shape, self.mesh)

    def sharding(self, logical_axes: Sequence[Optional[str]], shape: Sequence[int]) -> NamedSharding:
        return NamedSharding(self.mesh, self.spec(logical_axes, shape))

    def constrain(self, x: jax.Array, logical_axes: Sequence[Optional[str]]) -> jax.Array:
        """with_sharding_constraint of x by logical axis names (one per dimension of x)."""
        return jax.lax.with_sharding_constraint(x, self.sharding(logical_axes, x.shape))

    def tree_shardings(self, logical: Any, shapes: Any) -> Any:
        """A tree of NamedShardings from a tree of logical PartitionSpecs and a matching tree
        of arrays or ShapeDtypeStructs."""

        def one(spec, shape):
            mesh_spec = nn.logical_to_mesh_axes(spec, self.rules)
            return NamedSharding(self.mesh, _fit_spec(mesh_spec, shape.shape, self.mesh))

        return jax.tree.map(one, logical, shapes, is_leaf=lambda x: isinstance(x, P))

    def param_shardings(self, abstract_boxed: Any) -> Any:
        """Shardings for an unboxed param tree, from the boxed (logically annotated) abstract
        tree that `jax.eval_shape(model.init, ...)` returns."""
        return self.tree_shardings(nn.get_partition_spec(abstract_boxed), nn.unbox(abstract_boxed))


def constrain(layout: Optional[Layout], x: jax.Array, logical_axes: Sequence[Optional[str]]) -> jax.Array:
    """`layout.constrain(x, logical_axes)`; x unchanged without a layout (one device)."""
    return x if layout is None else layout.constrain(x, logical_axes)


def to_host(x: jax.Array) -> np.ndarray:
    """The whole value of a (possibly multi-host sharded) array as numpy on every host."""
    if x.is_fully_addressable:
        return np.asarray(jax.device_get(x))
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
