"""Compile every program a run would compile, for a target slice, without the slice and
without weights; print each program's per-chip memory against the chip's HBM.

  rlaif aot --gin_file=configs/models/llama2_7b.gin \\
    --gin_file=configs/mesh/tpu_v4_32.gin \\
    --gin_file=configs/experiments/paper/arms/dpo_gpt4_on_sft_gpt35_10pct.gin --topology=v4-32

An arm (run_arm.stages) compiles its stages' programs: sft / dpo (its preference_objective) / kto / reward_model train
steps, the policy-samples and evaluation samplers (prefill + decode), PPO's rollout,
scoring and update. A single-stage recipe compiles its `train` step or train_ppo's
programs. Batches are the global ones: a pipeline's global_batch_size where it is bound (it
must split evenly over the slice's hosts), else its per-process batch_size times the hosts.
TPU slices (v4-32, v5e-16, v5p-64, ...) need libtpu (.[tpu-aot]); --topology=cpu-N
compiles for N fake CPU devices instead (memory indicative only).

Exits 1 when a program does not fit (or leaves less than --min_headroom free), naming it
and its largest arguments; --json prints one JSON document instead of the table.
"""

from __future__ import annotations

import copy
import fnmatch
import inspect
import json
import os
import sys

import gin

from rlaif_jax import aot
from rlaif_jax import sharding as shd
from rlaif_jax.cli import gin_arg_parser, parse_gin
from rlaif_jax.data.pipeline.builders import labelled_pipeline, preference_pipeline, sft_pipeline
from rlaif_jax.errors import ConfigError
from rlaif_jax.eval.evaluate import evaluate
from rlaif_jax.eval.settings import EvalSamplingSettings
from rlaif_jax.feedback.settings import SamplingSettings
from rlaif_jax.feedback.stages import policy_samples_stage
from rlaif_jax.lora import LoraSettings
from rlaif_jax.models.config import numerics_overrides
from rlaif_jax.pipeline import ArmSettings
from rlaif_jax.pipeline.stages import PREFERENCE_OBJECTIVES
from rlaif_jax.train import KTO, SFT, RewardModel
from rlaif_jax.train.loop import train
from rlaif_jax.train.optim import make_optimizer
from rlaif_jax.train.ppo import PPOConfig, train_ppo

_UNSET = object()
# What an HF export's config.json carries none of: a model loaded from one (train_ppo's
# policy and reward model, the samplers) gets DecoderConfig's defaults for these.
_RUNTIME_DEFAULTS = dict(
    dtype="float32", param_dtype="float32", remat_policy="none", attention_impl="auto", vocab_chunk_size=0
)


def setting(fn, name: str, param: str, scope: str = "", default=_UNSET):
    """The value a call of configurable `fn` (gin name `name`) inside `scope` would get for
    `param`: the scoped binding, the unscoped one, else the signature's default."""
    keys = ([f"{scope}/{name}.{param}"] if scope else []) + [f"{name}.{param}"]
    for key in keys:
        try:
            return copy.deepcopy(gin.query_parameter(key))  # evaluates @refs and %macros
        except ValueError:
            continue
    if default is not _UNSET:
        return default
    d = inspect.signature(fn).parameters[param].default
    if d is inspect.Parameter.empty or d is gin.REQUIRED:
        raise ConfigError(f"{name}.{param} is unbound; the AOT compile needs it from the config")
    return d


def _shape(mesh) -> str:
    return " x ".join(f"{k} {v}" for k, v in mesh.shape.items())


def model_config(scope: str = ""):

    cfg = setting(train, "train", "model_config", scope, default=None)
    if cfg is None:
        raise ConfigError(
            "train.model_config is unset: add a model file (--gin_file=configs/models/<name>.gin); "
            "the AOT compile builds the model from its config, never from weights"
        )
    return cfg


def exported(cfg, **overrides):
    """The config of a model loaded from an HF export of `cfg` with these numerics
    overrides (the rest of dtype, remat, ...: DecoderConfig's defaults)."""
    return cfg.replace(**{**_RUNTIME_DEFAULTS, **overrides})


def layout(devices):
    """The Layout a run builds where it starts: make_mesh (in the caller's gin scope) over
    the target's devices, with logical_rules()."""

    return shd.Layout(shd.make_mesh(devices=devices), shd.logical_rules())


def train_programs(aot, target, stage: str, objective=None):

    with gin.config_scope(stage or None):
        objective = objective or setting(train, "train", "objective", stage)
        cfg = model_config(stage)
        pipe, pipe_name = {
            "sft": (sft_pipeline, "sft_pipeline"),
            "labelled": (labelled_pipeline, "labelled_pipeline"),
        }.get(objective.data_kind, (preference_pipeline, "preference_pipeline"))
        rows, batch_note = aot.global_rows(
            pipe_name,
            setting(pipe, pipe_name, "batch_size", stage),
            setting(pipe, pipe_name, "global_batch_size", stage),
            target.hosts,
            target.name,
        )
        seq_len = setting(pipe, pipe_name, "seq_len", stage)
        grad_accum = setting(train, "train", "grad_accum", stage)
        seed = setting(train, "train", "seed", stage)
        tx, schedule = make_optimizer(params=None, default_total_steps=1000)
        lay = layout(target.devices)
        # As train builds it: LoraSettings() in the stage's scope when train.lora is unbound.
        lora = setting(train, "train", "lora", stage, default=None) or LoraSettings()
    precomputed = getattr(objective, "reference", None) == "precomputed"
    batch = aot.batch_layout(objective.data_kind, rows, seq_len, precomputed)
    note = f"{stage or 'train'}: {batch_note}; mesh {_shape(lay.mesh)}"
    if lora.enabled:
        note += f"; LoRA rank {lora.rank} on {lora.targets!r}, base {lora.quantize}"
    return note, aot.train_step_programs(
        stage or "train", objective, cfg, tx, schedule, lay, batch, grad_accum, seed, lora=lora
    )


def ppo_programs(aot, target, stage: str):

    with gin.config_scope(stage or None):
        config = setting(train_ppo, "train_ppo", "config", stage)
        tx, _ = make_optimizer(params=None, default_total_steps=1000)
        lay = layout(target.devices)
        # The policy and reward model as train_ppo loads them: the SFT / reward exports'
        # config.json (this model file's architecture) with train_ppo.numerics.
        numerics = numerics_overrides("train_ppo.numerics", setting(train_ppo, "train_ppo", "numerics", stage))
        cfg = exported(model_config(stage), **numerics)
        seed = setting(train_ppo, "train_ppo", "seed", stage)
        # As train_ppo builds it: LoraSettings() in the stage's scope when train_ppo.lora is unbound.
        lora = setting(train_ppo, "train_ppo", "lora", stage, default=None) or LoraSettings()
    if not isinstance(config, PPOConfig):
        raise ConfigError(f"train_ppo.config = {config!r}: expected a PPOConfig (e.g. @PPOConfig())")
    rows = config.rollout_batch_size * config.samples_per_prompt * target.hosts
    note = (
        f"{stage or 'ppo'}: rollout of {rows} sequences = PPOConfig.rollout_batch_size {config.rollout_batch_size} "
        f"x samples_per_prompt {config.samples_per_prompt} x {target.hosts} host(s); mesh {_shape(lay.mesh)}; "
        f"mini-batches of {config.mini_batch_size}; policy, reference, value and reward models in {cfg.dtype} "
        f"compute, {cfg.param_dtype} params, remat {cfg.remat_policy} (train_ppo.numerics = {numerics or None})"
    )
    if lora.enabled:
        note += f"; LoRA rank {lora.rank} on {lora.targets!r}, base {lora.quantize} (= the reference)"
    return note, aot.ppo_programs(cfg, config, tx, lay, rows, seed=seed, lora=lora)


def sampler_programs(aot, target, stage: str):
    if stage == "samples":
        name, fn, Settings = "policy_samples_stage", policy_samples_stage, SamplingSettings
    else:
        name, fn, Settings = "evaluate", evaluate, EvalSamplingSettings
    get = lambda p: setting(fn, name, p, stage)  # noqa: E731
    bucket = get("length_bucket") if "length_bucket" in inspect.signature(fn).parameters else 32
    dtype, mesh_shape = get("dtype"), get("mesh_shape")
    with gin.config_scope(stage):
        sampling = get("sampling") or Settings()  # None: the stage builds it from gin in its scope
        # LocalModel loads the checkpoint in `dtype` (params too), on one host's chips.
        cfg = exported(model_config(stage), dtype=dtype, param_dtype=dtype)
        local = target.host0_devices
        mesh = shd.make_mesh(*mesh_shape, devices=local) if mesh_shape else shd.make_mesh(1, 1, 1, devices=local[:1])
        lay = shd.Layout(mesh, shd.logical_rules())
    prompt = -(-sampling.max_prompt_length // 16) * 16  # SamplingParams.prompt_bucket
    new = -(-(sampling.max_length - 1) // bucket) * bucket  # the longest budget: a one-token prompt
    note = (
        f"{stage}: {sampling.batch_size} prompts per batch on one host's {mesh.size} chip(s), {dtype}; the "
        f"largest shapes: prompts padded to {prompt}, {new} decode steps"
    )
    return note, aot.sampler_programs(
        stage, cfg, lay, sampling.batch_size, prompt, new, sampling.temperature, sampling.top_p, sampling.top_k
    )


def plan(aot, target) -> list:
    """[(note, [Program])] for what the parsed config runs."""

    config = gin.config_str()
    try:
        stages = gin.query_parameter("run_arm.stages")
    except ValueError:
        stages = None
    if stages is not None:
        out = []
        for stage in stages:
            if stage == "sft" and setting(ArmSettings, "run_arm", "sft_fraction") == 0.0:
                continue
            if stage in ("sft", "dpo", "kto", "reward_model"):
                # The dpo stage trains run_arm.preference_objective (DPO, ORPO, CPO).
                preference = PREFERENCE_OBJECTIVES[setting(ArmSettings, "run_arm", "preference_objective")]
                with gin.config_scope(stage):
                    objective = {"sft": SFT, "dpo": preference, "kto": KTO, "reward_model": RewardModel}[stage]()
                out.append(train_programs(aot, target, stage, objective))
            elif stage == "ppo":
                out.append(ppo_programs(aot, target, stage))
            elif stage in ("samples", "evaluate"):
                out.append(sampler_programs(aot, target, stage))
        return out
    if "train_ppo." in config:
        return [ppo_programs(aot, target, "")]
    if "train.objective" in config:
        return [train_programs(aot, target, "")]
    raise ConfigError(
        "the config runs nothing to compile: give an experiment (train.objective / train_ppo) or an "
        "arm (run_arm.stages) with --gin_file"
    )


def main(argv=None) -> int:
    ap = gin_arg_parser(__doc__)
    ap.add_argument(
        "--topology",
        required=True,
        help="the slice: v4-8|v4-16|v4-32|v4-64|v5e-4|v5e-16|v5e-32|v5p-8|v5p-32|v5p-64|cpu-N",
    )
    ap.add_argument(
        "--programs",
        action="append",
        default=[],
        help="compile only programs whose name matches this glob, e.g. 'dpo/*' (repeatable)",
    )
    ap.add_argument(
        "--min_headroom",
        type=float,
        default=0.0,
        help="fail a program that leaves less than this fraction of HBM free (e.g. 0.2)",
    )
    ap.add_argument("--json", action="store_true", help="one JSON document on stdout instead of the table")
    args = ap.parse_args(argv)
    # The compile targets the topology's devices, not this machine's: jax starts on the CPU
    # (no TPU runtime to look for), with N devices for cpu-N.
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    if args.topology.startswith("cpu-") and args.topology[4:].isdigit():
        flags = os.environ.get("XLA_FLAGS", "")
        if "xla_force_host_platform_device_count" not in flags:
            os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={args.topology[4:]}".strip()
    parse_gin(args)

    target = aot.target(args.topology)
    reports, notes, warnings = [], [], []
    for note, programs in plan(aot, target):
        chosen = [p for p in programs if not args.programs or any(fnmatch.fnmatch(p.name, g) for g in args.programs)]
        if not chosen:
            continue
        notes.append(note)
        for p in chosen:
            print(f"compiling {p.name} for {target.name} ...", file=sys.stderr, flush=True)
            report, _ = aot.compile_program(p, target)
            reports.append(report)
            warnings.extend(report.warnings)
    if not reports:
        raise ConfigError(f"--programs {args.programs}: no program of this config matches")
    bad = [r for r in reports if not r.fits or r.headroom < args.min_headroom]
    if args.json:
        print(
            json.dumps(
                {
                    "topology": target.name,
                    "platform": target.platform,
                    "devices": len(target.devices),
                    "hosts": target.hosts,
                    "hbm_bytes": target.hbm_bytes,
                    "note": target.note,
                    "settings": notes,
                    "warnings": warnings,
                    "programs": [r.as_dict() for r in reports],
                },
                indent=1,
            )
        )
    else:
        print(aot.format_table(reports, target))
        for n in notes:
            print(f"  {n}")
        for w in warnings:
            print(f"warning: {w}")
    for r in bad:
        biggest = ", ".join(f"{name} {b / aot.GiB:.2f} GiB" for name, b in r.largest[:3])
        what = (
            f"needs {r.total_bytes / aot.GiB:.2f} GiB per chip of {r.hbm_bytes / aot.GiB:.1f}, {r.verdict()}"
            if not r.fits
            else f"leaves {r.headroom:.0%} of {r.hbm_bytes / aot.GiB:.1f} GiB free, under "
            f"--min_headroom {args.min_headroom:.0%}"
        )
        print(
            f"error: {r.name} {what} (temporaries {r.temp_bytes / aot.GiB:.2f} GiB; largest arguments per chip: "
            f"{biggest})",
            file=sys.stderr,
        )
    return 1 if bad else 0
