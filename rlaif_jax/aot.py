"""Ahead-of-time compilation of a run's programs for a target slice, from abstract params.

JAX compiles for a TPU topology on a machine without one (libtpu describes the slice's
chips), and `compiled.memory_analysis()` then gives each program's per-chip argument,
output and temporary bytes: out-of-memory and sharding mistakes show before a pod is
rented. Every program is the run's own jitted function (train.step.jit_step,
PPOTrainer.compile, sampling's compiled generate) lowered on ShapeDtypeStructs that carry
the run's placement (param_shardings, step.initial_state_shardings), so no weight is ever
created and the executable is the one the run would compile. The model resolves its
attention kernel from its layout's devices (decoder.platform): splash for a TPU topology
even on a CPU host.

What the runs would do that is not a library call (which models, which params, the
abstract batches) lives in this module, one function per program kind.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import re
import time
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from rlaif_jax import sharding as shd
from rlaif_jax.data.pipeline.builders import per_process_batch
from rlaif_jax.errors import ConfigError
from rlaif_jax.lora import LoraModel, LoraSettings
from rlaif_jax.lora import training as lora_training
from rlaif_jax.lora.adapters import abstract_adapters, quantize_base
from rlaif_jax.models import DecoderConfig, build_model
from rlaif_jax.models.heads import SCORE_HEAD, head_param
from rlaif_jax.models.params import abstract_params, param_shardings
from rlaif_jax.train.ppo import VALUE_HEAD, LoraPPOTrainer, PPOTrainer
from rlaif_jax.train.step import (
    TrainState,
    batch_shardings,
    create_state,
    initial_state_shardings,
    jit_step,
    make_train_step,
)

GiB = 1024**3

# name -> (topology for get_topology_desc, chip_config_name, HBM GiB per chip). Names count
# chips for v5e and TensorCores for v4 / v5p (two per chip), as Cloud TPU names slices. Hosts
# come from libtpu's description (TOPOLOGY_OPTIONS where it differs from Cloud's machines).
TPU_TOPOLOGIES = {
    "v4-8": ("v4:2x2x1", "megacore", 32),
    "v4-16": ("v4:2x2x2", "megacore", 32),
    "v4-32": ("v4:2x2x4", "megacore", 32),
    "v4-64": ("v4:2x4x4", "megacore", 32),
    "v5e-4": ("v5e:2x2", None, 16),
    "v5e-8": ("v5e:2x4", None, 16),
    "v5e-16": ("v5e:4x4", None, 16),
    "v5e-32": ("v5e:4x8", None, 16),
    "v5p-8": ("v5p:2x2x1", None, 95),
    "v5p-32": ("v5p:2x2x4", None, 95),
    "v5p-64": ("v5p:2x4x4", None, 95),
}
# Extra get_topology_desc arguments. libtpu's default host for a 2x4 v5e is 2x2 chips (two
# hosts); Cloud's v5litepod-8 (ct5lp-hightpu-8t) is one host of 8 chips, as
# chips_per_host_bounds (2, 4, 1) describes it (else the per-process batch would be halved).
TOPOLOGY_OPTIONS = {"v5e-8": {"chips_per_host_bounds": (2, 4, 1)}}
CPU_NOTE = "CPU devices share the host's memory: the per-device budget (host RAM / N) is indicative only"


@dataclasses.dataclass(frozen=True)
class Target:
    """A slice to compile for: its devices (all of them, over every host), one chip's
    memory, and how many hosts (processes) feed it."""

    name: str
    platform: str  # "tpu" | "cpu"
    devices: tuple
    hbm_bytes: int
    note: str = ""

    @property
    def hosts(self) -> int:
        return len({d.process_index for d in self.devices})

    @property
    def host0_devices(self) -> tuple:
        """The first host's chips: what a per-host sampler (policy samples, evaluation) meshes."""
        return tuple(d for d in self.devices if d.process_index == self.devices[0].process_index)


def known_topologies() -> list[str]:
    return sorted(TPU_TOPOLOGIES) + ["cpu-N"]


def target(name: str) -> Target:
    """The Target for `--topology`: a TPU slice name (v4-32, v5e-16, v5p-64, ...; needs
    libtpu) or cpu-N (N of this process's CPU devices; XLA_FLAGS
    --xla_force_host_platform_device_count=N must allow them).

    Args:
      name: the slice name.
    Returns:
      The Target.
    """
    if name.startswith("cpu-"):
        n = name[4:]
        if not n.isdigit() or int(n) < 1:
            raise ConfigError(f"--topology={name}: cpu-N needs a whole number N >= 1, e.g. cpu-8")
        cpus = jax.devices("cpu")
        if len(cpus) < int(n):
            raise ConfigError(
                f"--topology={name}: this process has {len(cpus)} CPU device(s); start it with "
                f"XLA_FLAGS=--xla_force_host_platform_device_count={n} (scripts/aot_compile.py sets "
                "it when jax has not started yet)"
            )
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        return Target(name, "cpu", tuple(cpus[: int(n)]), ram // int(n), CPU_NOTE)
    if name not in TPU_TOPOLOGIES:
        raise ConfigError(f"--topology={name}: unknown slice; known: {', '.join(known_topologies())}")
    topo_name, chip_config, hbm_gib = TPU_TOPOLOGIES[name]
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")  # no cloud metadata server off a TPU VM
    # Compiling opens no chip: several compiling processes (a sweep, the tests) may share libtpu.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    if importlib.util.find_spec("libtpu") is None:  # the TPU compiler
        raise ConfigError(
            f"--topology={name}: compiling for a TPU needs libtpu; pip install -c constraints.txt "
            "-e '.[tpu-aot]' (or use --topology=cpu-N)"
        )
    from jax.experimental import topologies

    kw = {"chip_config_name": chip_config} if chip_config else {}
    kw.update(TOPOLOGY_OPTIONS.get(name, {}))
    topo = topologies.get_topology_desc(topology_name=topo_name, platform="tpu", **kw)
    return Target(name, "tpu", tuple(topo.devices), hbm_gib * GiB)


# -- programs ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Program:
    """One jitted function as the run jits it (its shardings and donation), with the
    abstract arguments to lower it on.

    flops: analytic FLOPs per call (all chips), from DecoderConfig.flops_per_token: XLA's
    cost_analysis counts a scanned layer body once. batch_rows: (what, rows) for every batch
    that the program splits over the mesh's batch axes (data x fsdp)."""

    name: str
    jitted: Any  # a jax.jit-wrapped function
    args: tuple
    mesh: Mesh
    flops: float = 0.0
    batch_rows: tuple = ()
    arg_names: tuple = ()
    # Per-chip bytes of arguments that are other arguments' arrays passed again (LoRA PPO's
    # frozen base is also the reference and the critic's trunk): the compiler counts them in
    # each parameter, the chip holds them once.
    shared_bytes: int = 0


def abstract(tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs of `tree`'s leaves carrying `shardings` (a matching tree).

    Args:
      tree: arrays or ShapeDtypeStructs.
      shardings: a matching tree of Shardings.
    Returns:
      The tree of sharded ShapeDtypeStructs.
    """
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def model_params(cfg: DecoderConfig, layout: shd.Layout, lm_head: bool = True, scalar_heads: Sequence[str] = ()):
    """(model, abstract params placed as load_hf / init_params place them on `layout`)."""
    model = build_model(cfg, lm_head=lm_head, scalar_heads=scalar_heads, layout=layout)
    return model, abstract(nn.unbox(abstract_params(model)), param_shardings(model))


def global_rows(
    pipeline: str, batch_size: Optional[int], global_batch_size: Optional[int], hosts: int, slice_name: str = ""
) -> tuple[int, str]:
    """The rows of a pipeline's global batch on a slice of `hosts` hosts (one process each),
    and the settings phrase saying where they come from: global_batch_size when it is bound
    (refused, as the run's pipeline refuses it, when the hosts do not split it evenly), else
    the per-process batch_size times the hosts.

    Args:
      pipeline: the configurable ("sft_pipeline" / "preference_pipeline").
      batch_size, global_batch_size: its bindings (None: unbound; exactly one is bound).
      hosts: the target's hosts.
      slice_name: the target's name, for messages.
    Returns:
      (rows, phrase), e.g. (8, "global batch 8 (2 per process x 4 hosts) =
      preference_pipeline.global_batch_size").
    """

    n_hosts = f"{hosts} host{'s' if hosts != 1 else ''}"
    where = f"the {slice_name}'s {n_hosts}" if slice_name else n_hosts
    per = per_process_batch(pipeline, batch_size, global_batch_size, hosts, processes=where)
    rows = per * hosts
    if global_batch_size is None:
        return rows, f"global batch {rows} = {pipeline}.batch_size {per} x {hosts} host(s)"
    return rows, f"global batch {rows} ({per} per process x {n_hosts}) = {pipeline}.global_batch_size"


def batch_layout(kind: str, rows: int, length: int, precomputed_reference: bool = False) -> dict:
    """ShapeDtypeStructs of the batch a pipeline yields (rlaif_jax.data.pipeline.batches):
    kind "sft" (tokens, positions, segment_ids, loss_mask), "preference" (the same keys
    prefixed chosen_ / rejected_, plus the reference log-probs when precomputed) or
    "labelled" (KTO's: the SFT keys, `label` [rows] float32, and the mismatched pairs' SFT
    keys prefixed kl_). Packing changes the contents, not the shapes.

    Args:
      kind: "sft", "preference" or "labelled".
      rows: the global batch (global_rows: global_batch_size, or the per-process batch_size
        x processes).
      length: the pipeline's seq_len.
      precomputed_reference: DPO.reference == "precomputed".
    Returns:
      {key: ShapeDtypeStruct} without shardings.
    """

    def seq(prefix=""):
        out = {
            f"{prefix}{k}": jax.ShapeDtypeStruct((rows, length), jnp.int32)
            for k in ("tokens", "positions", "segment_ids")
        }
        out[f"{prefix}loss_mask"] = jax.ShapeDtypeStruct((rows, length), jnp.float32)
        return out

    if kind == "sft":
        return seq()
    if kind == "labelled":
        return {**seq(), **seq("kl_"), "label": jax.ShapeDtypeStruct((rows,), jnp.float32)}
    if kind != "preference":
        raise ValueError(f"unknown batch kind {kind!r}; one of 'sft', 'preference', 'labelled'")
    out = {**seq("chosen_"), **seq("rejected_")}
    if precomputed_reference:
        out.update({k: jax.ShapeDtypeStruct((rows,), jnp.float32) for k in ("ref_chosen_logps", "ref_rejected_logps")})
    return out


def _placed_batch(batch: Any, mesh: Mesh) -> Any:
    # As shard_batch places a host batch: rows over data x fsdp where they divide.
    return abstract(batch, batch_shardings(batch, mesh))


def initial_state(params: Any, tx, seed: int, extra: Optional[dict] = None) -> TrainState:
    """The abstract TrainState that step.init_state creates for `params` (abstract, placed),
    with its placement."""
    shapes = jax.eval_shape(lambda p, e: create_state(p, tx, seed, e), params, extra)
    return abstract(shapes, initial_state_shardings(params, tx, seed, extra))


def train_step_programs(
    name: str,
    objective,
    cfg: DecoderConfig,
    tx,
    schedule,
    layout: shd.Layout,
    batch: dict,
    grad_accum: int = 1,
    seed: int = 0,
    lora: Optional[LoraSettings] = None,
) -> list[Program]:
    """The `train` loop's one compiled step (SFT / DPO / reward model), with the frozen
    reference when the objective needs one, as train.step.compile_step jits it.

    Args:
      name: the program's name prefix ("sft", "dpo", ...).
      objective: SFT(), DPO(), RewardModel() (as gin builds them).
      cfg: the model's config.
      tx, schedule: make_optimizer's result.
      layout: the training mesh over the target's devices, and the rules.
      batch: batch_layout(...) of the global batch.
      grad_accum: train.grad_accum.
      seed: train.seed.
      lora: train.lora; with LoRA on, the state holds the adapters and the step's constant
        is the frozen (quantized) base, as rlaif_jax.lora.training.prepare splits them.
    Returns:
      [the train step Program].
    """
    mesh = layout.mesh
    model, params = model_params(cfg, layout, objective.lm_head, objective.scalar_heads)
    ref = params if objective.needs_reference else None  # the loop's copy, placed alike
    if lora is not None and lora.enabled:
        # The reference is the base with adapters off: no copy (reference_from not modelled).
        params, ref = lora_training.abstract_split(objective, model, params, lora)
        objective, model = lora_training.LoraObjective(objective), LoraModel(model, lora)
    state = initial_state(params, tx, seed)
    batch = _placed_batch(batch, mesh)
    jitted = jit_step(make_train_step(objective, model, tx, schedule, grad_accum), state, batch, mesh, ref)
    rows, length = next(iter(batch.values())).shape[:2]
    seqs = rows * (2 if any(k.startswith("chosen_") for k in batch) else 1)
    # 6N per token forward + backward; a reference forward adds 2N.
    flops = cfg.flops_per_token(length) * seqs * length * (4 / 3 if objective.needs_reference else 1)
    # The rows the model runs on: a preference batch's pairs are concatenated (chosen, then
    # rejected) and constrained over the batch axes as twice as many rows.
    what = "batch" if seqs == rows else "chosen + rejected batch"
    checks = [(what, seqs)] + ([("micro-batch", seqs // grad_accum)] if grad_accum > 1 else [])
    return [
        Program(
            f"{name}/train_step",
            jitted,
            (state, batch, ref),
            mesh,
            flops=flops,
            batch_rows=tuple(checks),
            arg_names=("state", "batch", "ref_params"),
        )
    ]


def _prompts(rows: int, length: int, mesh: Mesh) -> tuple:
    """Left-padded prompt tokens / positions / segment ids, placed as shard_batch places them."""
    one = jax.ShapeDtypeStruct((rows, length), jnp.int32)
    return _placed_batch((one, one, one), mesh)


def _rng(mesh: Mesh):
    key = jax.eval_shape(lambda: jax.random.key(0))
    return jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=NamedSharding(mesh, P()))


def generate_flops(cfg: DecoderConfig, rows: int, prompt: int, new_tokens: int) -> float:
    """Forward FLOPs (a third of flops_per_token) of a prefill of `prompt` tokens plus
    `new_tokens` decode steps attending over the cache, for `rows` sequences."""
    fwd = lambda n: cfg.flops_per_token(n) / 3  # noqa: E731
    return rows * (prompt * fwd(prompt) + new_tokens * fwd(2 * (prompt + new_tokens)))


def sampler_programs(
    name: str,
    cfg: DecoderConfig,
    layout: shd.Layout,
    rows: int,
    prompt_length: int,
    new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
) -> list[Program]:
    """The sampler's one program (KV-cache prefill + while-loop decode, as
    sampling.generate jits it) at its largest shapes: prompts padded to prompt_length,
    new_tokens decode steps.

    Args:
      name: program name prefix ("samples", "evaluate").
      cfg: the sampler's model config (its dtype and param_dtype as it loads the weights).
      layout: the sampler's mesh (one host's chips) and rules.
      rows: prompts per batch.
      prompt_length: the padded prompt length.
      new_tokens: decode steps.
      temperature, top_p, top_k: the sampling settings (they choose the sampling code).
    Returns:
      [the generate Program].
    """
    from rlaif_jax.sampling import SamplingParams, _compiled

    mesh = layout.mesh
    model, params = model_params(cfg, layout)
    sp = SamplingParams(
        max_new_tokens=new_tokens, temperature=temperature, top_p=top_p, top_k=top_k, eos_ids=tuple(cfg.eos_token_ids)
    )
    return [
        Program(
            f"{name}/generate",
            _compiled(model, sp),
            (params, *_prompts(rows, prompt_length, mesh), _rng(mesh)),
            mesh,
            flops=generate_flops(cfg, rows, prompt_length, new_tokens),
            batch_rows=(("prompts", rows),),
            arg_names=("params", "tokens", "positions", "segment_ids", "rng"),
        )
    ]


def ppo_programs(
    cfg: DecoderConfig,
    config,
    tx,
    layout: shd.Layout,
    rows: int,
    reward_cfg: Optional[DecoderConfig] = None,
    seed: int = 0,
    lora: Optional[LoraSettings] = None,
) -> list[Program]:
    """PPO's three programs as PPOTrainer.compile jits them: rollout (the sampler), scoring
    (policy, reference, value and reward forwards, advantages) and the update (ppo_epochs x
    mini-batches of the clipped losses), with models and params as train_ppo builds them.
    With LoRA on (train_ppo.lora), as LoraPPOTrainer: the state holds the adapters (and value
    head), and each program takes the frozen (quantized) base, which is also the reference.

    Args:
      cfg: the policy's config as train_ppo loads it (the SFT export's config.json with
        train_ppo.numerics).
      config: the PPOConfig.
      tx: the PPO optimizer.
      layout: the training mesh and rules.
      rows: the global rollout (rollout_batch_size x samples_per_prompt x processes).
      reward_cfg: the reward model's config (default: cfg).
      seed: train_ppo.seed.
      lora: train_ppo.lora.
    Returns:
      [rollout, score, update] Programs.
    """

    mesh = layout.mesh
    reward_cfg = reward_cfg or cfg
    rm_model, rm_params = model_params(reward_cfg, layout, lm_head=False, scalar_heads=(SCORE_HEAD,))
    _, policy = model_params(cfg, layout)
    ref = policy  # train_ppo's copy of the policy, placed alike
    params = {"policy": policy}
    if config.uses_critic:
        # The shared critic is a head on the policy; a separate one the reward model's trunk.
        shared = config.value_model == "shared"
        _, head_host = model_params(cfg if shared else reward_cfg, layout, lm_head=shared, scalar_heads=(VALUE_HEAD,))
        params["policy" if shared else "value"] = head_host
    frozen = ()  # LoRA: the programs' last argument, the frozen base
    if lora is not None and lora.enabled:
        params, frozen = _lora_ppo_split(cfg, config, policy, lora, layout)
        ref = frozen["policy"]
        trainer = LoraPPOTrainer(
            cfg, config, tx, layout, ref, rm_model, rm_params, value_cfg=cfg, lora=lora, frozen=frozen
        )
        _sample, _score = trainer._sample_f, trainer._score_f
        frozen = (frozen,)
    else:
        trainer = PPOTrainer(cfg, config, tx, layout, ref, rm_model, rm_params, value_cfg=reward_cfg)
        _sample, _score = trainer._sample, trainer._score
    state = initial_state(params, tx, seed, trainer.initial_extra())
    prompts = _prompts(rows, config.max_prompt_length, mesh)
    sample, score, update = trainer.compile(state, prompts)
    if frozen:  # the jitted functions themselves, which take the base as their last argument
        sample, score, update = trainer.jitted
    rng = _rng(mesh)
    response, lengths = _placed_batch(jax.eval_shape(_sample, state.params, prompts, rng, *frozen), mesh)
    kl_coef = state.extra["kl_coef"]
    scored, _ = jax.eval_shape(_score, state.params, ref, rm_params, kl_coef, prompts, response, lengths, *frozen)
    scored = _placed_batch(scored, mesh)

    # LoRA: frozen["value"] is the policy base's arrays, and the reference is frozen["policy"].
    size = lambda t: sum(_per_chip_bytes(x) for x in jax.tree.leaves(t))  # noqa: E731
    twice = size(frozen[0]["value"]) if frozen else 0
    n_pol = 1 + (config.uses_critic and config.value_model == "separate")
    P_, R = config.max_prompt_length, config.max_new_tokens
    T = P_ + R
    fwd = cfg.flops_per_token(T) / 3 * rows * T
    return [
        Program(
            "ppo/rollout",
            sample,
            (state.params, prompts, rng, *frozen),
            mesh,
            flops=generate_flops(cfg, rows, P_, R),
            batch_rows=(("rollout", rows),),
            arg_names=("params", "prompts", "rng", "frozen"),
            shared_bytes=twice,
        ),
        Program(
            "ppo/score",
            score,
            (state.params, ref, rm_params, kl_coef, prompts, response, lengths, *frozen),
            mesh,
            flops=fwd * (2 + n_pol),
            batch_rows=(("rollout", rows),),
            arg_names=("params", "ref_params", "reward_params", "kl_coef", "prompts", "response", "lengths", "frozen"),
            shared_bytes=twice + (size(ref) if frozen else 0),
        ),
        Program(
            "ppo/update",
            update,
            (state, scored, *frozen),
            mesh,
            flops=fwd * 3 * n_pol * config.ppo_epochs,
            batch_rows=(("rollout", rows), ("mini-batch", config.mini_batch_size)),
            arg_names=("state", "batch", "frozen"),
            shared_bytes=twice,
        ),
    ]


def _placed_adapters(model, lora: LoraSettings) -> Any:
    """The abstract adapters of `model`, placed as init_adapters places them."""
    boxed = abstract_adapters(model, lora)
    return abstract(nn.unbox(boxed), model.layout.param_shardings(boxed))


def _lora_ppo_split(cfg: DecoderConfig, config, policy: Any, lora: LoraSettings, layout: shd.Layout):
    """rlaif_jax.lora.ppo.split on abstract params: (trainable, frozen)."""
    base = quantize_base(policy, lora, layout)
    shared = config.uses_critic and config.value_model == "shared"
    trainable = {
        "policy": _placed_adapters(build_model(cfg, scalar_heads=(VALUE_HEAD,) if shared else (), layout=layout), lora)
    }
    frozen = {"policy": base, "value": None}
    if config.uses_critic:
        value_model, value_params = model_params(cfg, layout, lm_head=False, scalar_heads=(VALUE_HEAD,))
        head = value_params[head_param(VALUE_HEAD)]
        if shared:
            trainable["policy"][head_param(VALUE_HEAD)] = head
        else:
            trainable["value"] = {**_placed_adapters(value_model, lora), head_param(VALUE_HEAD): head}
            frozen["value"] = {k: v for k, v in base.items() if k != "lm_head"}
    return trainable, frozen


# -- compiling and reporting -------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Report:
    """One compiled program's per-chip memory (bytes), analytic FLOPs and compile time."""

    name: str
    argument_bytes: int
    output_bytes: int
    alias_bytes: int
    temp_bytes: int
    code_bytes: int
    hbm_bytes: int
    flops: float
    chips: int
    compile_s: float
    warnings: tuple = ()
    largest: tuple = ()  # (argument path, per-chip bytes), largest first
    shared_bytes: int = 0  # Program.shared_bytes: counted in argument_bytes, held once
    # The compiler's refusal (out of memory): temp_bytes is then what it said it needed and
    # argument_bytes the abstract arguments' per-chip sum.
    error: str = ""

    @property
    def total_bytes(self) -> int:
        """Peak per-chip footprint: arguments (less those passed twice: shared_bytes) +
        outputs not aliased to a donated argument +        temporaries + code (MaxText's and axlearn's accounting)."""
        return (
            self.argument_bytes
            - self.shared_bytes
            + self.output_bytes
            - self.alias_bytes
            + self.temp_bytes
            + self.code_bytes
        )

    @property
    def fits(self) -> bool:
        return not self.error and self.total_bytes <= self.hbm_bytes

    @property
    def headroom(self) -> float:
        return 1 - self.total_bytes / self.hbm_bytes

    def verdict(self) -> str:
        if self.error:
            return f"does not compile: {self.error}"
        if not self.fits:
            return f"over by {(self.total_bytes - self.hbm_bytes) / GiB:.1f} GiB"
        return f"fits ({self.headroom:.0%} free)"

    def as_dict(self) -> dict:
        return {
            **dataclasses.asdict(self),
            "total_bytes": self.total_bytes,
            "fits": self.fits,
            "headroom": self.headroom,
            "verdict": self.verdict(),
            "largest": [list(x) for x in self.largest],
        }


def _per_chip_bytes(x) -> int:
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        return 0  # an RNG key: a few bytes
    sh = getattr(x, "sharding", None)
    shape = sh.shard_shape(x.shape) if sh is not None else x.shape
    return int(math.prod(shape)) * np.dtype(x.dtype).itemsize


def _largest_args(program: Program, n: int = 5) -> tuple:
    names = program.arg_names or tuple(f"arg{i}" for i in range(len(program.args)))
    rows = []
    for name, arg in zip(names, program.args):
        for path, leaf in jax.tree_util.tree_flatten_with_path(arg)[0]:
            if hasattr(leaf, "shape"):
                rows.append((name + jax.tree_util.keystr(path), _per_chip_bytes(leaf)))
    return tuple(sorted(rows, key=lambda r: -r[1])[:n])


def replication_warnings(program: Program, hbm_bytes: Optional[int] = None) -> list[str]:
    """Batches whose rows do not split over the mesh's batch axes (data x fsdp): fit_sharding
    then drops the axes that do not divide and every chip computes the same rows. With
    hbm_bytes: arguments of which over 1% of a chip's memory is replicated on every chip."""
    shards = program.mesh.shape["data"] * program.mesh.shape["fsdp"]
    out = []
    names = program.arg_names or tuple(f"arg{i}" for i in range(len(program.args)))
    for name, arg in zip(names, program.args):
        leaves = [
            (jax.tree_util.keystr(path), x)
            for path, x in jax.tree_util.tree_flatten_with_path(arg)[0]
            if getattr(x, "sharding", None) is not None and x.sharding.is_fully_replicated
        ]
        replicated = sorted(((_per_chip_bytes(x), path) for path, x in leaves), reverse=True)
        total = sum(b for b, _ in replicated)
        if hbm_bytes and program.mesh.size > 1 and total > 0.01 * hbm_bytes:
            out.append(
                f"{program.name}: {total / GiB:.2f} GiB of {name} is replicated on every chip "
                f"(e.g. {name}{replicated[0][1]})"
            )
    for what, rows in program.batch_rows:
        if shards > 1 and rows % shards:
            # fit_sharding keeps only the leading batch axes that divide the rows.
            spec = shd.fit_sharding(shd.batch_sharding(program.mesh, 1), (rows,)).spec[0]
            axes = (spec,) if isinstance(spec, str) else tuple(spec or ())
            split = math.prod(program.mesh.shape[a] for a in axes)
            out.append(
                f"{program.name}: the {what} of {rows} rows does not split over data x fsdp = {shards} "
                f"devices: it is replicated {shards // split}-fold (each chip repeats work); use a batch "
                f"that {shards} divides, or a mesh with fewer batch shards (tensor parallelism)"
            )
    return out


def compile_program(program: Program, target: Target) -> tuple[Report, Any]:
    """Lower and compile one program for the target; (its Report, the compiled executable).

    Args:
      program: what to compile.
      target: the slice (the programs' meshes are over its devices).
    Returns:
      (Report, jax.stages.Compiled), or (Report with .error, None) when the compiler finds
      the program does not fit the chip.
    """
    t0 = time.perf_counter()
    lowered = program.jitted.lower(*program.args)
    common = dict(
        name=program.name,
        hbm_bytes=target.hbm_bytes,
        flops=program.flops,
        chips=program.mesh.size,
        warnings=tuple(replication_warnings(program, target.hbm_bytes)),
        largest=_largest_args(program),
        shared_bytes=program.shared_bytes,
    )
    try:
        compiled = lowered.compile()
    except jax.errors.JaxRuntimeError as e:
        # The TPU compiler refuses a program whose temporaries outgrow the chip.
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        need = re.search(r"temporaries \(([\d.]+)([KMGT])\)", str(e))
        temp = int(float(need.group(1)) * 1024 ** "KMGT".index(need.group(2)) * 1024) if need else 0
        args = sum(_per_chip_bytes(x) for x in jax.tree.leaves(program.args) if hasattr(x, "shape"))
        avail = re.search(r"available HBM \(([\d.]+[KMGT])\)", str(e))
        line = (
            f"out of memory, temporaries {need.group(1)}{need.group(2)} > {avail.group(1)} available"
            if need and avail
            else str(e).strip().splitlines()[0].split("RESOURCE_EXHAUSTED: ")[-1]
        )
        return Report(
            argument_bytes=args,
            output_bytes=0,
            alias_bytes=0,
            temp_bytes=temp,
            code_bytes=0,
            compile_s=time.perf_counter() - t0,
            error=line,
            **common,
        ), None
    m = compiled.memory_analysis()
    get = lambda k: int(getattr(m, k, 0) or 0) if m is not None else 0  # noqa: E731
    report = Report(
        argument_bytes=get("argument_size_in_bytes"),
        output_bytes=get("output_size_in_bytes"),
        alias_bytes=get("alias_size_in_bytes"),
        temp_bytes=get("temp_size_in_bytes"),
        code_bytes=get("generated_code_size_in_bytes"),
        compile_s=time.perf_counter() - t0,
        **common,
    )
    return report, compiled


def format_table(reports: Sequence[Report], target: Target) -> str:
    """A markdown table, one row per program (GiB per chip)."""
    g = lambda b: f"{b / GiB:.2f}"  # noqa: E731
    lines = [
        f"target {target.name}: {len(target.devices)} {target.platform} devices over {target.hosts} host(s), "
        f"{target.hbm_bytes / GiB:.1f} GiB per chip" + (f" ({target.note})" if target.note else ""),
        "",
        "| program | chips | args GiB | out GiB | temp GiB | total GiB | of HBM | TFLOP/step | TFLOP/chip "
        "| compile s | verdict |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in reports:
        lines.append(
            f"| {r.name} | {r.chips} | {g(r.argument_bytes)} | {g(r.output_bytes - r.alias_bytes)} | "
            f"{g(r.temp_bytes)} | {g(r.total_bytes)} | {g(r.hbm_bytes)} | {r.flops / 1e12:.1f} | "
            f"{r.flops / 1e12 / r.chips:.2f} | {r.compile_s:.0f} | {r.verdict()} |"
        )
    return "\n".join(lines)
