"""Ahead-of-time compilation for a slice (rlaif_jax.aot, scripts/aot_compile.py): a small
model's SFT and DPO steps compiled for a real TPU topology (v5e 2x2, through libtpu: splash
attention from this CPU host) and for fake CPU devices, with the compiled executables' input
shardings checked, so a sharding regression (params or optimizer state replicated, the batch
not split over data x fsdp) fails here; PPO's programs are the trainer's own; the state the
runs create (step.init_state) is placed as the programs are compiled."""

import json
import math
import os
import re
import types

import gin
import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding

from rlaif_jax import aot
from rlaif_jax import sharding as shd
from rlaif_jax.errors import ConfigError
from rlaif_jax.models import DecoderConfig
from rlaif_jax.train import DPO, SFT, make_optimizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Small, but every dimension the rules shard divides 4 devices; 128 tokens: splash-sized.
CFG = DecoderConfig(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    max_position_embeddings=256,
    dtype="bfloat16",
    remat_policy="dots",
)
ROWS, LENGTH = 8, 128


def _libtpu_target(name):
    pytest.importorskip(
        "libtpu",
        reason="libtpu is not installed: the TPU AOT tests need pip install -c "
        "constraints.txt -e '.[test,tpu-aot]' (CI installs it)",
    )
    return aot.target(name)


def _layout(target, *shape):
    return shd.Layout(shd.make_mesh(*(shape or (1, -1, 1)), devices=target.devices), shd.logical_rules())


def _programs(objective, target):
    tx, schedule = make_optimizer(name="rmsprop", learning_rate=1e-6, clip_norm=10.0)
    batch = aot.batch_layout(objective.data_kind, ROWS, LENGTH)
    return aot.train_step_programs(
        type(objective).__name__.lower(), objective, CFG, tx, schedule, _layout(target), batch
    )


def _mesh_axes(sharding: NamedSharding) -> set:
    axes = set()
    for entry in sharding.spec:
        axes.update((entry,) if isinstance(entry, str) else tuple(entry or ()))
    return axes


def _check_compiled(objective, target):
    (program,) = _programs(objective, target)
    report, compiled = aot.compile_program(program, target)
    # The model picks its kernel from its layout's devices, not this CPU host's backend.
    assert ("tpu_custom_call" in compiled.as_text()) == (target.platform == "tpu")
    (state_sh, batch_sh, ref_sh), _ = compiled.input_shardings
    # The state (params and the optimizer state that follows them) and the reference are
    # split over fsdp (ZeRO-3): a chip holds a quarter of them, bar the few unsplit norms.
    state, ref = program.args[0], program.args[2]
    trees = [(state.params, state_sh.params), (state.opt_state, state_sh.opt_state)]
    trees += [(ref, ref_sh)] if objective.needs_reference else []
    for values, shardings in trees:
        leaves = list(zip(jax.tree.leaves(values), jax.tree.leaves(shardings)))
        whole = sum(x.size * x.dtype.itemsize for x, _ in leaves)
        per_chip = sum(math.prod(s.shard_shape(x.shape)) * x.dtype.itemsize for x, s in leaves)
        assert whole > 0 and per_chip < 0.27 * whole, (per_chip, whole)
        for x, s in leaves:
            if x.ndim >= 3 or x.size >= CFG.vocab_size * CFG.hidden_size:  # stacked matrices, embeddings
                assert "fsdp" in _mesh_axes(s), (x.shape, s)
    # The batch's rows over data x fsdp, nothing else split.
    for key, s in batch_sh.items():
        assert tuple(s.spec)[0] == ("data", "fsdp"), (key, s)
        assert all(e is None for e in tuple(s.spec)[1:]), (key, s)
    assert report.argument_bytes > 0 and report.temp_bytes >= 0 and report.fits
    assert report.warnings == ()
    assert report.flops == pytest.approx(
        CFG.flops_per_token(LENGTH) * ROWS * LENGTH * (2 * 4 / 3 if objective.needs_reference else 1)
    )
    return report


@pytest.mark.parametrize("objective", [SFT(), DPO(beta=0.05)], ids=["sft", "dpo"])
def test_tpu_v5e_steps_compile_sharded(objective):
    target = _libtpu_target("v5e-4")
    assert target.platform == "tpu" and len(target.devices) == 4 and target.hbm_bytes == 16 * aot.GiB
    report = _check_compiled(objective, target)
    assert report.total_bytes < 1 * aot.GiB


def test_the_runs_state_is_placed_as_compiled():
    """step.init_state (what `train` and `train_ppo` create their state with) on real params:
    the optimizer's moments sharded like their params, not replicated (tx.init's zeros
    depend on no input: left to XLA, jit put them on every chip), the values create_state's,
    and the placement the one the AOT programs are compiled for."""
    from rlaif_jax.models import build_model, init_params
    from rlaif_jax.train.step import create_state, init_state

    target = aot.target("cpu-4")
    layout = _layout(target)
    params = init_params(build_model(CFG, layout=layout), jax.random.key(0))
    tx, _ = make_optimizer(name="adamw", learning_rate=1e-6, clip_norm=1.0)
    extra = {"kl_coef": jax.numpy.float32(0.05)}
    state = init_state(params, tx, 3, extra)
    # stacked matrices and embeddings: the unsplit norms stay replicated, as their params
    moments = [x for x in jax.tree.leaves(state.opt_state) if x.ndim >= 3 or x.size >= CFG.vocab_size * CFG.hidden_size]
    assert len(moments) >= 2 * 8
    for x in moments:
        assert not x.sharding.is_fully_replicated, x.sharding
    import optax

    expected = aot.abstract(
        jax.eval_shape(lambda p: create_state(p, tx, 3, extra), params), jax.tree.map(lambda x: x.sharding, state)
    )
    sh = lambda t: [x.sharding for x in jax.tree.leaves(t)]  # noqa: E731
    assert sh(aot.initial_state(params, tx, 3, extra)) == sh(expected)
    same = optax.tree_map_params(
        tx, lambda x, p: x.sharding == p.sharding, state.opt_state, params, transform_non_params=lambda _: True
    )
    assert all(jax.tree.leaves(same))
    reference = create_state(jax.device_get(params), tx, 3, extra)  # eager, unplaced
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(reference)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# The paper's separate value model here; the shared one (its numerics in test_ppo.py) in the slow suite.
def _small_ppo(value_model: str):
    """The target, a small PPOConfig and an optimizer for the PPO program tests."""
    from rlaif_jax.train.ppo import PPOConfig

    config = PPOConfig(
        rollout_batch_size=8,
        mini_batch_size=4,
        ppo_epochs=1,
        max_new_tokens=8,
        max_prompt_length=8,
        value_model=value_model,
    )
    tx, _ = make_optimizer(name="adamw", learning_rate=1e-6, clip_norm=1.0)
    return aot.target("cpu-4"), config, tx


@pytest.mark.parametrize("value_model", [pytest.param("shared", marks=pytest.mark.slow), "separate"])
def test_ppo_programs_are_the_trainers_own(value_model):
    """PPO's rollout, scoring and update are PPOTrainer.compile's jitted programs, lowered
    on abstract policy / reference / reward params placed as train_ppo places them."""
    target, config, tx = _small_ppo(value_model)
    programs = aot.ppo_programs(CFG, config, tx, _layout(target), rows=8)
    assert [p.name for p in programs] == ["ppo/rollout", "ppo/score", "ppo/update"]
    for p in programs:
        report, compiled = aot.compile_program(p, target)
        assert report.fits and report.warnings == () and compiled is not None, report
    update = programs[2]
    state = update.args[0]
    assert set(state.params) == ({"policy"} if value_model == "shared" else {"policy", "value"})
    assert state.extra["kl_coef"].shape == () and state.extra["kl_coef"].sharding.is_fully_replicated
    (state_sh, batch_sh), _ = compiled.input_shardings
    for x, s in zip(jax.tree.leaves(state.opt_state), jax.tree.leaves(state_sh.opt_state)):
        if x.ndim >= 3:  # stacked layer moments: split over fsdp like their params
            assert "fsdp" in _mesh_axes(s), (x.shape, s)


@pytest.mark.parametrize("value_model, quantize", [("shared", "none"), ("separate", "nf4")])
def test_lora_ppo_programs_are_the_lora_trainers_own(value_model, quantize):
    """With train_ppo.lora on, the programs are LoraPPOTrainer's: the state holds only the
    adapters (and the value head), the frozen (quantized) base is every program's last
    argument, split over fsdp like the params."""
    from rlaif_jax.lora import LoraSettings

    target, config, tx = _small_ppo(value_model)
    lora = LoraSettings(rank=4, quantize=quantize, block_size=32)
    programs = aot.ppo_programs(CFG, config, tx, _layout(target), rows=8, lora=lora)
    assert [p.name for p in programs] == ["ppo/rollout", "ppo/score", "ppo/update"]
    for p in programs:
        report, compiled = aot.compile_program(p, target)
        assert report.fits and report.warnings == () and compiled is not None, report
        assert p.arg_names[-1] == "frozen" and len(p.args) == len(p.arg_names)
    state, _, frozen = programs[2].args
    assert set(state.params) == ({"policy"} if value_model == "shared" else {"policy", "value"})
    kernels = [jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_flatten_with_path(state.params)[0]]
    assert kernels and all("lora_" in k or "value" in k for k in kernels), kernels
    assert (frozen["value"] is None) == (value_model == "shared")
    # The base is passed again as the reference (score) and the critic's trunk (separate
    # critic): counted once in the footprint.
    rollout, score, update = (p.shared_bytes for p in programs)
    assert score > update == rollout and (update > 0) == (value_model == "separate")
    (_, _, frozen_sh), _ = compiled.input_shardings
    for x, s in zip(jax.tree.leaves(frozen), jax.tree.leaves(frozen_sh)):
        if x.ndim >= 3 and x.size >= 2048:  # stacked layer kernels / codes (not the small scales)
            assert "fsdp" in _mesh_axes(s), (x.shape, s)


def test_tpu_compiler_out_of_memory_is_a_verdict():
    target = _libtpu_target("v5e-4")
    mesh = shd.make_mesh(1, -1, 1, devices=target.devices)
    x = jax.ShapeDtypeStruct((16, 2**30), jax.numpy.float32, sharding=NamedSharding(mesh, jax.sharding.PartitionSpec()))
    program = aot.Program(
        "oom/sort", jax.jit(lambda x: jax.numpy.sort(x * 2, axis=1)[:, :4]), (x,), mesh, arg_names=("x",)
    )
    report, compiled = aot.compile_program(program, target)
    assert compiled is None and not report.fits
    assert report.verdict().startswith("does not compile: out of memory, temporaries ")
    assert report.verdict().endswith(" available")
    assert report.argument_bytes == 64 * aot.GiB and report.temp_bytes > 16 * aot.GiB
    assert report.warnings == ("oom/sort: 64.00 GiB of x is replicated on every chip (e.g. x)",)


def test_cpu_devices_step_compiles_sharded():
    target = aot.target("cpu-4")
    assert target.platform == "cpu" and target.hosts == 1 and "indicative" in target.note
    _check_compiled(SFT(), target)


def test_v5e_8_is_one_host_of_eight_chips():
    """Cloud's v5litepod-8 is one 8-chip host; libtpu's default for 2x4 is two hosts."""
    t = _libtpu_target("v5e-8")
    assert (len(t.devices), t.hosts, len(t.host0_devices)) == (8, 1, 8)
    assert (len(aot.target("v5e-16").devices), aot.target("v5e-16").hosts) == (16, 4)


def test_kto_step_compiles_with_the_labelled_pipelines_batch():
    """KTO's batch layout is the labelled pipeline's (the SFT keys, `label`, the mismatched
    kl_ rows: same keys, shapes and dtypes as a real batch), and its step (with the
    step-batch KL statistic) compiles with every batch entry's rows over data x fsdp."""
    from rlaif_jax.data.pipeline.labelled import pad_labelled_batch
    from rlaif_jax.data.tokenize.encode import Encoded
    from rlaif_jax.train import KTO

    examples = [Encoded(np.array([1, 5, 6], np.int32), np.array([7, 2], np.int32))] * ROWS
    real = pad_labelled_batch(examples, [1, 0] * (ROWS // 2), ROWS, LENGTH, LENGTH)
    layout = aot.batch_layout("labelled", ROWS, LENGTH)
    assert {k: (v.shape, v.dtype) for k, v in layout.items()} == {
        k: (v.shape, np.dtype(v.dtype)) for k, v in real.items()
    }
    target = aot.target("cpu-4")
    (program,) = _programs(KTO(), target)
    report, compiled = aot.compile_program(program, target)
    (_, batch_sh, _), _ = compiled.input_shardings
    assert set(batch_sh) == set(layout)
    for key, sh in batch_sh.items():
        assert tuple(sh.spec)[0] == ("data", "fsdp"), (key, sh)
    assert report.argument_bytes > 0 and report.fits
    with pytest.raises(ValueError, match="unknown batch kind 'pairs'"):
        aot.batch_layout("pairs", ROWS, LENGTH)


def test_unknown_topology_lists_the_known_ones():
    with pytest.raises(ConfigError, match=r"--topology=v9-8: unknown slice; known: .*v4-32.*v5e-16.*v5p-64.*cpu-N"):
        aot.target("v9-8")
    with pytest.raises(ConfigError, match="xla_force_host_platform_device_count=4096"):
        aot.target("cpu-4096")


def test_a_batch_that_does_not_divide_the_batch_shards_is_reported():
    target = aot.target("cpu-8")
    mesh = shd.make_mesh(1, -1, 1, devices=target.devices)
    p = aot.Program("sft/train_step", lambda x: x, (), mesh, batch_rows=(("batch", 8), ("micro-batch", 4)))
    (w,) = aot.replication_warnings(p)
    # fit_sharding drops fsdp (8 does not divide 4) and keeps data (1): 8-fold
    assert "micro-batch of 4 rows does not split over data x fsdp = 8 devices: it is replicated 8-fold" in w
    mesh_d = shd.make_mesh(2, 4, 1, devices=target.devices)  # data 2 divides 6, fsdp 4 does not: 4-fold
    (w,) = aot.replication_warnings(aot.Program("x", lambda x: x, (), mesh_d, batch_rows=(("batch", 6),)))
    assert "replicated 4-fold" in w
    mesh_t = shd.make_mesh(1, 4, 2, devices=target.devices)  # tensor parallelism: 4 batch shards
    assert aot.replication_warnings(aot.Program("x", lambda x: x, (), mesh_t, batch_rows=(("batch", 4),))) == []


def _script():
    """`rlaif aot` (scripts/aot_compile.py in a clone)."""
    from rlaif_jax.commands import aot as command

    return command


def test_script_on_cpu_devices_reports_replication_and_fails_without_headroom(clean_gin, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    rc = _script().main(
        [
            "--gin_file=configs/experiments/tiny_sft.gin",
            "--gin_file=configs/mesh/fsdp_all.gin",
            "--gin_param=sft_pipeline.batch_size=4",
            "--topology=cpu-8",
            "--json",
            "--min_headroom=1.0",
            "--log_level=WARNING",
        ]
    )
    out, err = capsys.readouterr()
    assert rc == 1
    doc = json.loads(out)
    assert doc["topology"] == "cpu-8" and doc["devices"] == 8 and "indicative" in doc["note"]
    (prog,) = doc["programs"]
    assert prog["name"] == "train/train_step" and prog["fits"] and prog["total_bytes"] > 0
    assert doc["settings"] == [
        "train: global batch 4 = sft_pipeline.batch_size 4 x 1 host(s); mesh data 1 x fsdp 8 x tensor 1"
    ]
    assert any(
        "batch of 4 rows does not split over data x fsdp = 8 devices: it is replicated 8-fold" in w
        for w in doc["warnings"]
    )
    assert "error: train/train_step leaves 100% of" in err and "under --min_headroom 100%" in err
    assert "largest arguments per chip: state." in err


def test_global_rows_come_from_the_global_or_the_per_process_batch():
    assert aot.global_rows("preference_pipeline", None, 8, 4, "v4-32") == (
        8,
        "global batch 8 (2 per process x 4 hosts) = preference_pipeline.global_batch_size",
    )
    assert aot.global_rows("sft_pipeline", None, 8, 1) == (
        8,
        "global batch 8 (8 per process x 1 host) = sft_pipeline.global_batch_size",
    )
    # A per-process batch_size (global_batch_size unbound): times the hosts, as before.
    assert aot.global_rows("sft_pipeline", 8, None, 4, "v4-32") == (
        32,
        "global batch 32 = sft_pipeline.batch_size 8 x 4 host(s)",
    )
    with gin.config_scope("dpo"), pytest.raises(ConfigError) as e:
        aot.global_rows("preference_pipeline", None, 12, 8, "v5p-64")
    assert str(e.value) == (
        "dpo/preference_pipeline.global_batch_size = 12 does not split evenly over the v5p-64's 8 hosts; "
        "make it a multiple of 8 (e.g. 8 or 16)"
    )
    with pytest.raises(
        ConfigError, match="sft_pipeline.batch_size = 2 .per process. and sft_pipeline.global_batch_size = 8"
    ):
        aot.global_rows("sft_pipeline", 2, 8, 4, "v4-32")


def test_script_compiles_the_global_batch_on_several_hosts(clean_gin, monkeypatch):
    """With global_batch_size bound the script's train step takes the global batch on a
    4-host slice (CPU devices standing in for its chips; nothing is compiled here), and a
    global batch the hosts do not split is refused before anything is built."""
    monkeypatch.chdir(ROOT)
    gin.parse_config_files_and_bindings(
        ["configs/experiments/tiny_sft.gin", "configs/mesh/fsdp_all.gin"],
        ["sft_pipeline.batch_size = None", "sft_pipeline.global_batch_size = 8"],
    )
    four_hosts = types.SimpleNamespace(name="v4-32", hosts=4, devices=aot.target("cpu-4").devices)
    ((note, (program,)),) = _script().plan(aot, four_hosts)
    assert note == (
        "train: global batch 8 (2 per process x 4 hosts) = sft_pipeline.global_batch_size; "
        "mesh data 1 x fsdp 4 x tensor 1"
    )
    assert {x.shape for x in program.args[1].values()} == {(8, 32)}
    assert aot.replication_warnings(program) == []
    with gin.unlock_config():
        gin.bind_parameter("sft_pipeline.global_batch_size", 6)
    with pytest.raises(ConfigError, match=re.escape("over the v4-32's 4 hosts; make it a multiple of 4 (e.g. 4 or 8)")):
        _script().plan(aot, four_hosts)
