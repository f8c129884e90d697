"""Bad settings stop a run before it trains or writes anything, one writer per run
directory, and a failed write (a full disk) is one StorageError that keeps what was written."""

import errno
import functools
import os

import jax
import jax.numpy as jnp
import pytest

from rlaif_jax import sharding as shd
from rlaif_jax.cli import user_error_line
from rlaif_jax.errors import ConfigError, StorageError, UserError
from rlaif_jax.outputs import OutputInUseError, writer_lock
from rlaif_jax.train import DPO, SFT, RewardModel, make_optimizer
from rlaif_jax.train.advantages import KLController
from rlaif_jax.train.checkpoint import TMP_MARKER, Checkpointer
from rlaif_jax.train.loop import train
from rlaif_jax.train.metrics import MetricsWriter, read_jsonl, truncate_after
from rlaif_jax.train.ppo import PPOConfig, train_ppo
from rlaif_jax.train.rundir import RunDir
from tests.train.fixtures import loop_args, make_world, sft_data, tiny_config

ONE_DEVICE = functools.partial(shd.make_mesh, 1, 1, 1, devices=jax.devices()[:1])


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tok, tok_dir, demos, prefs = make_world(str(tmp_path_factory.mktemp("world")))
    return dict(tok_dir=tok_dir, demos=demos, prefs=prefs, cfg=tiny_config(len(tok)))


def _args(world, run, **kw):
    args = dict(
        run_dir=str(run),
        objective=SFT(),
        train_data=sft_data(world["demos"]),
        num_steps=4,
        model_config=world["cfg"],
        tokenizer=world["tok_dir"],
        mesh=ONE_DEVICE,
        log_every=1,
        optimizer=functools.partial(make_optimizer, learning_rate=1e-3),
    )
    args.update(kw)
    return loop_args(args)


def _opt(**kw):
    return functools.partial(make_optimizer, **kw)


@pytest.mark.parametrize(
    "override,binding",
    [
        # Before: batch_size 0 "finished" after 0 steps and exported the random initial weights.
        (dict(pipeline=dict(batch_size=0)), "sft_pipeline.batch_size = 0"),
        (dict(pipeline=dict(batch_size=-8)), "sft_pipeline.batch_size = -8"),
        (dict(pipeline=dict(num_epochs=0)), "sft_pipeline.num_epochs = 0"),
        (dict(pipeline=dict(max_prompt_length=40)), "sft_pipeline.max_prompt_length = 40"),
        # Before: a learning rate of 0 trained nothing and a negative one trained uphill, exit 0.
        (dict(optimizer=_opt(learning_rate=0.0)), "make_optimizer.learning_rate = 0.0"),
        (dict(optimizer=_opt(learning_rate=-1e-3)), "make_optimizer.learning_rate = -0.001"),
        (dict(optimizer=_opt(learning_rate=float("nan"))), "make_optimizer.learning_rate = nan"),
        (dict(optimizer=_opt(warmup_steps=-1)), "make_optimizer.warmup_steps = -1"),
        (dict(optimizer=_opt(weight_decay=-0.1)), "make_optimizer.weight_decay = -0.1"),
        (dict(optimizer=_opt(b2=1.0)), "make_optimizer.b2 = 1.0"),
        (dict(optimizer=_opt(clip_norm=0.0)), "make_optimizer.clip_norm = 0.0"),
        (dict(optimizer=_opt(schedule="cosine"), num_steps=None), "make_optimizer.schedule = 'cosine' needs"),
        (dict(num_steps=0), "train.num_steps = 0"),
        (dict(grad_accum=0), "train.grad_accum = 0"),
        (dict(log_every=0), "LoopSettings.log_every = 0"),
        (dict(checkpoint_every=-1), "LoopSettings.checkpoint_every = -1"),
        (dict(eval_every=-2), "train.eval_every = -2"),
        (dict(keep_checkpoints=0), "LoopSettings.keep_checkpoints = 0"),
        (dict(model_config=None), "train.model_config and train.init_from are both unset"),
    ],
)
def test_bad_settings_stop_the_run_before_it_trains_or_writes(world, tmp_path, override, binding):
    if "pipeline" in override:
        override = dict(train_data=functools.partial(sft_data(world["demos"]), **override["pipeline"]))
    with pytest.raises(ConfigError) as e:
        train(**_args(world, tmp_path, **override))
    assert str(e.value).startswith(binding), str(e.value)
    assert len(user_error_line(e.value).splitlines()) == 1
    assert not (tmp_path / "hf").exists() and not (tmp_path / "metrics.jsonl").exists()
    assert not (tmp_path / "checkpoints").exists() or not os.listdir(tmp_path / "checkpoints")


@pytest.fixture
def policy_stub(tmp_path):
    """Passes the directory checks; nothing loads it."""
    d = tmp_path / "policy"
    d.mkdir()
    (d / "config.json").write_text("{}")
    return str(d)


@pytest.mark.parametrize(
    "make,binding",
    [
        (lambda: DPO(beta=0.0), "DPO.beta = 0.0"),
        (lambda: DPO(label_smoothing=0.5), "DPO.label_smoothing = 0.5"),
        (lambda: DPO(rpo_alpha=-1.0), "DPO.rpo_alpha = -1.0"),
        (lambda: DPO(loss_type="sigmod"), "DPO.loss_type = 'sigmod'"),
        (lambda: RewardModel(margin=-0.5), "RewardModel.margin = -0.5"),
        (lambda: SFT(reduction="avg"), "SFT.reduction = 'avg'"),
        (lambda: PPOConfig(clip_range=0.0), "PPOConfig.clip_range = 0.0"),
        (lambda: PPOConfig(gamma=1.5), "PPOConfig.gamma = 1.5"),
        (lambda: PPOConfig(lam=-0.1), "PPOConfig.lam = -0.1"),
        (lambda: PPOConfig(mini_batch_size=0), "PPOConfig.mini_batch_size = 0"),
        (lambda: PPOConfig(rollout_batch_size=10, mini_batch_size=4), "PPOConfig.mini_batch_size = 4"),
        (lambda: PPOConfig(ppo_epochs=0), "PPOConfig.ppo_epochs = 0"),
        (lambda: KLController(init_coef=-0.1), "KLController.init_coef = -0.1"),
        (lambda: KLController(target=0.0), "KLController.target = 0.0"),
    ],
)
def test_objective_and_ppo_settings_name_their_binding(make, binding):
    with pytest.raises(ConfigError, match="^" + binding.replace(".", r"\.").replace("(", r"\(")):
        make()


def test_gin_scope_is_part_of_the_named_binding():
    import gin

    with gin.config_scope("dpo"):
        with pytest.raises(ConfigError, match=r"^dpo/make_optimizer\.learning_rate = -1"):
            make_optimizer(learning_rate=-1)


def test_data_with_no_batch_is_a_user_error_and_nothing_is_exported(world, tmp_path):
    # 32 examples, one epoch, batches of 64 with drop_remainder: before, the run "finished"
    # after 0 steps and exported untrained weights.
    with pytest.raises(UserError, match=r"^train\.train_data: the training data yields no batch"):
        train(
            **_args(world, tmp_path, train_data=sft_data(world["demos"], batch_size=64, num_epochs=1), num_steps=None)
        )
    assert not (tmp_path / "hf").exists() and not (tmp_path / "metrics.jsonl").exists()


def test_missing_model_and_tokenizer_directories_are_named(world, tmp_path, policy_stub):
    # Before: "not a local tokenizer directory", after the run directory was set up.
    with pytest.raises(ConfigError, match=r"^train\.init_from = '/no/such/sft': no such HF model directory"):
        train(**_args(world, tmp_path / "a", model_config=None, tokenizer=None, init_from="/no/such/sft"))
    with pytest.raises(ConfigError, match=r"^train\.tokenizer = '/no/tok': no such tokenizer directory"):
        train(**_args(world, tmp_path / "b", tokenizer="/no/tok"))
    with pytest.raises(ConfigError, match=r"^train_ppo\.policy = '/no/policy': no such HF model directory"):
        train_ppo(
            run_dir=str(tmp_path / "c"),
            policy="/no/policy",
            prompts=world["demos"],
            num_iterations=1,
            reward_fn=lambda *a: 0.0,
        )
    with pytest.raises(ConfigError, match=r"^train_ppo\.reward_model = '/no/rm'"):
        train_ppo(
            run_dir=str(tmp_path / "d"),
            policy=policy_stub,
            reward_model="/no/rm",
            prompts=world["demos"],
            num_iterations=1,
        )
    assert not any((tmp_path / d).exists() for d in "abcd")


def test_a_second_trainer_on_the_same_run_dir_stops_at_start(world, tmp_path, policy_stub):
    run = tmp_path / "run"
    with writer_lock(str(run), "train.run_dir"):  # the first trainer, still running
        with pytest.raises(OutputInUseError, match=r"is being written by pid \d+.*another train\.run_dir"):
            train(**_args(world, run))
        with pytest.raises(OutputInUseError, match="another train_ppo.run_dir"):
            train_ppo(
                run_dir=str(run), policy=policy_stub, prompts=world["demos"], num_iterations=1, reward_fn=lambda *a: 0.0
            )
    assert os.listdir(run) == [".writer.lock"]


def _enospc_in_orbax_commit(monkeypatch, step):
    """orbax's background commit of `step` fails as on a full disk."""
    from orbax.checkpoint._src.path import async_path

    real = async_path.write_text

    async def write_text(path, text):
        if f"{step}{TMP_MARKER}" in str(path):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return await real(path, text)

    monkeypatch.setattr(async_path, "write_text", write_text)


def test_a_checkpoint_that_cannot_be_written_is_one_storage_error_and_the_last_one_stays(tmp_path, monkeypatch, caplog):
    state = {"w": jnp.arange(8.0)}
    ckpt = Checkpointer(str(tmp_path / "ck"), keep=3, async_save=True)
    ckpt.save(4, state, {"epoch": 0})
    ckpt.wait()
    _enospc_in_orbax_commit(monkeypatch, 8)
    with pytest.raises(StorageError) as e:
        ckpt.save(8, state, {"epoch": 1})
        ckpt.wait()  # async: the failure surfaces here
    msg = str(e.value)
    assert str(tmp_path / "ck") in msg and "step 8" in msg and "No space left on device" in msg
    assert "step 4, is intact" in msg and "rerun the same command to resume from step 4" in msg
    ckpt.close()  # reported once: closing does not raise it again
    assert not [n for n in os.listdir(tmp_path / "ck") if TMP_MARKER in n]
    assert Checkpointer(str(tmp_path / "ck")).latest_step() == 4
    assert not [r for r in caplog.records if r.exc_info], "orbax's tracebacks are reduced to one line"


def test_an_hf_export_that_cannot_be_written_keeps_the_previous_export(tmp_path):
    rd = RunDir(str(tmp_path))

    def save(d, fail):
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, "model.safetensors"), "w") as f:
            f.write("new" if not fail else "half")
        if fail:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    rd.export_hf(lambda d: save(d, False), info={"step": 4})
    with pytest.raises(
        StorageError,
        match=r"hf: could not write the HF export \(No space left on device\).*"
        r"final checkpoint \(step 8\) is complete.*rerun the same command",
    ):
        rd.export_hf(lambda d: save(d, True), info={"step": 8})
    assert sorted(os.listdir(tmp_path)) == ["hf"]
    assert (tmp_path / "hf" / "model.safetensors").read_text() == "new"


def test_a_metrics_write_that_fails_is_a_storage_error_naming_the_file(tmp_path):
    w = MetricsWriter(str(tmp_path))
    w.write(1, {"loss": 1.0})

    class Full:
        def write(self, *a):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        flush = close = write

    w._f = Full()
    with pytest.raises(StorageError, match=r"metrics\.jsonl.*metrics of step 2 \(No space left on device\)"):
        w.write(2, {"loss": 0.5})
    w.close()  # nothing more to report, and no retry from tensorboardX at exit
    assert [r["step"] for r in read_jsonl(str(tmp_path / "metrics.jsonl"))] == [1]


def test_truncate_after_drops_later_rows_and_a_cut_last_line_only(tmp_path):
    p = tmp_path / "metrics.jsonl"
    p.write_text('{"step": 1}\n{"step": 2}\nnot json\n{"step": 3}\n{"step": 4}\n{"step": 5, "lo')
    assert truncate_after(str(p), 3) == 2
    assert p.read_text() == '{"step": 1}\n{"step": 2}\nnot json\n{"step": 3}\n'
    assert truncate_after(str(p), 3) == 0


def test_reference_precompute_checks_settings_and_never_shrinks_its_output(tmp_path):
    from rlaif_jax.data.records import PREFERENCES, write_records
    from rlaif_jax.outputs import OutputWouldShrinkError
    from rlaif_jax.train.reference import precompute_reference_logps

    prefs = str(tmp_path / "prefs")
    rows = [
        {"prompt_id": f"p{i}", "prompt": f"q{i}", "chosen": "a", "rejected": "b", "provenance": "t"} for i in range(2)
    ]
    write_records(prefs, PREFERENCES, rows)
    with pytest.raises(ConfigError, match=r"^precompute_reference_logps.batch_size = 0: must be a whole number"):
        precompute_reference_logps(
            preferences_dir=prefs, out_dir=str(tmp_path / "o"), reference=str(tmp_path), batch_size=0
        )
    with pytest.raises(ConfigError, match=r"^precompute_reference_logps.reference = .*no such HF model directory"):
        precompute_reference_logps(
            preferences_dir=prefs, out_dir=str(tmp_path / "o"), reference=str(tmp_path / "missing")
        )
    # A complete larger set in out_dir is refused before the reference is even looked at.
    out = str(tmp_path / "out")
    write_records(out, PREFERENCES, rows + [dict(rows[0], prompt_id="p9")])
    (tmp_path / "ref").mkdir()
    (tmp_path / "ref" / "config.json").write_text("{}")
    with pytest.raises(OutputWouldShrinkError, match="precompute_reference_logps.overwrite=True"):
        precompute_reference_logps(preferences_dir=prefs, out_dir=out, reference=str(tmp_path / "ref"))
