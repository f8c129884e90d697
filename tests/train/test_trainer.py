"""The training loop end to end on tiny models: objectives learn, resume is exact,
accumulation and sharding match, non-finite losses stop the run, gin drives it all."""

import functools
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

from rlaif_jax import sharding as shd
from rlaif_jax.models import build_model, init_params
from rlaif_jax.train import DPO, SFT, RewardModel, create_state, make_optimizer, make_train_step
from rlaif_jax.train.loop import LoopSettings, NonFiniteLossError, train
from rlaif_jax.train.metrics import read_jsonl
from tests.train.fixtures import loop_args, make_world, pref_data, sft_data, tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ONE_DEVICE = functools.partial(shd.make_mesh, 1, 1, 1, devices=jax.devices()[:1])


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    tok, tok_dir, demos, prefs = make_world(str(root))
    return dict(tok=tok, tok_dir=tok_dir, demos=demos, prefs=prefs, cfg=tiny_config(len(tok)))


@pytest.fixture(scope="module")
def sft_run(world, tmp_path_factory):
    run = str(tmp_path_factory.mktemp("sft"))
    out = train(
        run_dir=run,
        objective=SFT(),
        train_data=sft_data(world["demos"]),
        num_steps=60,
        model_config=world["cfg"],
        tokenizer=world["tok_dir"],
        optimizer=functools.partial(make_optimizer, learning_rate=3e-3),
        mesh=ONE_DEVICE,
        loop=LoopSettings(log_every=10),
        eval_data=sft_data(world["demos"], num_epochs=1, shuffle=False),
        eval_every=30,
        sample_prompts=["red green blue"],
        sample_max_new_tokens=8,
    )
    return run, out


def test_sft_memorises_and_writes_everything(sft_run):
    run, out = sft_run
    rows = [r for r in read_jsonl(os.path.join(run, "metrics.jsonl")) if "loss" in r]
    assert rows[0]["loss"] > 2 * rows[-1]["loss"]
    assert out["token_accuracy"] > 0.5 and np.isfinite(out["grad_norm"])
    for key in ("learning_rate", "tokens_per_second", "step_time", "nll_per_token", "eval/loss"):
        assert key in out
    samples = [r for r in read_jsonl(os.path.join(run, "metrics.jsonl")) if "sample/completion" in r]
    assert samples and samples[0]["sample/prompt"] == "red green blue"
    assert os.listdir(os.path.join(run, "tb"))
    assert os.path.exists(os.path.join(run, "config.gin")) and os.path.exists(os.path.join(run, "operative_config.gin"))
    import transformers

    m = transformers.AutoModelForCausalLM.from_pretrained(os.path.join(run, "hf"))
    assert m.config.num_hidden_layers == 2


def test_dpo_from_sft_raises_reward_accuracy(world, sft_run, tmp_path):
    out = train(
        run_dir=str(tmp_path),
        objective=DPO(beta=0.5),
        train_data=pref_data(world["prefs"]),
        num_steps=30,
        init_from=os.path.join(sft_run[0], "hf"),
        optimizer=functools.partial(make_optimizer, learning_rate=1e-3),
        mesh=ONE_DEVICE,
        loop=LoopSettings(log_every=10),
    )
    rows = [r for r in read_jsonl(str(tmp_path / "metrics.jsonl"))]
    assert out["rewards/accuracies"] >= 0.9 and out["rewards/margins"] > rows[0]["rewards/margins"]
    assert out["loss"] < 0.5 * np.log(2)


def test_reward_model_learns_and_exports_a_score_model(world, sft_run, tmp_path):
    out = train(
        run_dir=str(tmp_path),
        objective=RewardModel(),
        train_data=pref_data(world["prefs"]),
        num_steps=30,
        init_from=os.path.join(sft_run[0], "hf"),
        optimizer=functools.partial(make_optimizer, learning_rate=1e-3),
        mesh=ONE_DEVICE,
        loop=LoopSettings(log_every=10),
    )
    assert out["accuracy"] >= 0.9
    cfg = json.load(open(tmp_path / "hf" / "config.json"))
    assert cfg["architectures"] == ["LlamaForSequenceClassification"]
    assert "score.weight" in load_file(str(tmp_path / "hf" / "model.safetensors"))


def _sft_args(world, run, **kw):
    args = dict(
        run_dir=run,
        objective=SFT(),
        train_data=sft_data(world["demos"]),
        num_steps=8,
        model_config=world["cfg"],
        tokenizer=world["tok_dir"],
        mesh=ONE_DEVICE,
        log_every=2,
        optimizer=functools.partial(
            make_optimizer, name="rmsprop", learning_rate=1e-3, schedule="cosine", warmup_steps=2
        ),
        checkpoint_every=4,
        export_hf=True,
        async_checkpoint=True,
    )
    args.update(kw)
    return loop_args(args)


def _tb_steps(tb_dir, tag):
    """The steps TensorBoard shows for `tag`: event files in name order, a session START at
    step p dropping the earlier files' events from p on (its purge)."""
    import struct

    from tensorboardX.proto import event_pb2

    steps: list = []
    for name in sorted(os.listdir(tb_dir)):
        data = open(os.path.join(tb_dir, name), "rb").read()
        i = 0
        while i < len(data):
            (n,) = struct.unpack("<Q", data[i : i + 8])
            e = event_pb2.Event.FromString(data[i + 12 : i + 12 + n])
            i += 12 + n + 4
            if e.session_log.status == event_pb2.SessionLog.START:
                steps = [s for s in steps if s < e.step]
            steps += [e.step for v in e.summary.value if v.tag == tag]
    return sorted(steps)


def test_resume_after_preemption_is_bit_identical(world, tmp_path):
    train(**_sft_args(world, str(tmp_path / "straight")))
    # Killed three steps after the step-4 checkpoint (metrics logged at 2, 4, 6), then
    # relaunched with the same command.
    train(**_sft_args(world, str(tmp_path / "resumed"), stop_after=7))
    assert not (tmp_path / "resumed" / "hf").exists()
    train(**_sft_args(world, str(tmp_path / "resumed")))
    a = load_file(str(tmp_path / "straight" / "hf" / "model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "hf" / "model.safetensors"))
    assert set(a) == set(b)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    ra = read_jsonl(str(tmp_path / "straight" / "metrics.jsonl"))
    rb = read_jsonl(str(tmp_path / "resumed" / "metrics.jsonl"))
    assert [r["loss"] for r in ra if r["step"] > 4] == [r["loss"] for r in rb if r["step"] > 4]
    # Before: step 6 was in metrics.jsonl twice (logged before the kill and again after).
    assert [r["step"] for r in rb] == [r["step"] for r in ra] == [2, 4, 6, 8]
    # ... and in TensorBoard: the resumed writer purges the steps after the checkpoint.
    assert _tb_steps(str(tmp_path / "resumed" / "tb"), "loss") == [2, 4, 6, 8]


def test_nonfinite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(world, tmp_path):
    huge = functools.partial(make_optimizer, name="sgd", learning_rate=1e30, clip_norm=None)
    with pytest.raises(NonFiniteLossError, match=r"non-finite at step \d+.*position") as e:
        train(**_sft_args(world, str(tmp_path), optimizer=huge, num_steps=12, log_every=4, checkpoint_every=2))
    bad = int(str(e.value).split("at step ")[1].split()[0])
    steps = sorted(int(s) for s in os.listdir(tmp_path / "checkpoints") if s.isdigit())
    assert all(s <= bad for s in steps)
    assert any(f.startswith("nonfinite_batch") for f in os.listdir(tmp_path))


def _one_step(world, batch, grad_accum, mesh=None, objective=None, steps=1):
    objective = objective or SFT(reduction="mean")
    model = build_model(world["cfg"], layout=None if mesh is None else shd.Layout(mesh, shd.logical_rules()))
    params = init_params(model, jax.random.key(0))
    tx, sched = make_optimizer(name="sgd", learning_rate=0.5, clip_norm=None)
    state = create_state(params, tx, 0)
    step = jax.jit(make_train_step(objective, model, tx, sched, grad_accum))
    b = batch if mesh is None else shd.shard_batch(batch, mesh)
    for _ in range(steps):
        state, metrics = step(state, b, None)
    return jax.device_get(state.params), jax.device_get(metrics)


def _batch(world, n=8):
    it = sft_data(world["demos"], batch_size=n, shuffle=False)(tokenizer=world["tok"])
    batch = next(it)
    it.close()
    return batch


def test_gradient_accumulation_equals_one_large_batch(world):
    batch = _batch(world)
    # Rows have different numbers of response tokens: a naive mean of micro-batch means
    # would differ from the large-batch token mean.
    assert len(set(batch["loss_mask"].sum(1))) > 1
    p1, m1 = _one_step(world, batch, 1)
    p4, m4 = _one_step(world, batch, 4)
    assert abs(m1["loss"] - m4["loss"]) < 1e-5
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-6, rtol=1e-5), p1, p4)


# (2, 2, 2) shards data, fsdp and tensor at once; pure data parallelism in the slow suite (~20 s).
@pytest.mark.parametrize("sizes", [pytest.param((8, 1, 1), marks=pytest.mark.slow), (2, 2, 2)])
def test_sharded_training_matches_single_device(world, sizes):
    batch = _batch(world)
    p1, m1 = _one_step(world, batch, 1, steps=2)
    mesh = shd.make_mesh(*sizes)
    p8, m8 = _one_step(world, batch, 2, mesh=mesh, steps=2)
    assert abs(m1["loss"] - m8["loss"]) < 1e-5
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4), p1, p8)


def test_frozen_params_do_not_move(world):
    model = build_model(world["cfg"])
    params = init_params(model, jax.random.key(0))
    tx, sched = make_optimizer(learning_rate=1e-2, frozen=[r"^embed/", r"^layers/attn/"], params=params)
    state = create_state(params, tx, 0)
    step = jax.jit(make_train_step(SFT(), model, tx, sched))
    new, _ = step(state, _batch(world), None)
    np.testing.assert_array_equal(new.params["embed"]["embedding"], params["embed"]["embedding"])
    np.testing.assert_array_equal(
        new.params["layers"]["attn"]["q_proj"]["kernel"], params["layers"]["attn"]["q_proj"]["kernel"]
    )
    assert not np.array_equal(
        new.params["layers"]["mlp"]["up_proj"]["kernel"], params["layers"]["mlp"]["up_proj"]["kernel"]
    )


def test_dpo_with_precomputed_reference_equals_reference_model(world):
    from rlaif_jax.models import apply
    from rlaif_jax.train.logprobs import sequence_logps
    from rlaif_jax.train.objectives import concat_pairs

    it = pref_data(world["prefs"], shuffle=False)(tokenizer=world["tok"])
    batch = next(it)
    it.close()
    model = build_model(world["cfg"])
    ref = init_params(model, jax.random.key(5))
    policy = init_params(model, jax.random.key(6))
    both = concat_pairs(batch)
    lp = sequence_logps(
        apply(model, ref, both["tokens"], both["positions"], both["segment_ids"])["logits"],
        both["tokens"],
        both["loss_mask"],
    )
    pre = dict(batch, ref_chosen_logps=np.asarray(lp[:8]), ref_rejected_logps=np.asarray(lp[8:]))
    for avg in (False, True):
        a = DPO(reference="model", average_log_prob=avg).loss(model, policy, batch, ref, None)
        b = DPO(reference="precomputed", average_log_prob=avg).loss(model, policy, pre, None, None)
        assert float(a[0]) == pytest.approx(float(b[0]), rel=1e-5)
        assert float(a[2]["rewards/margins"][0]) == pytest.approx(float(b[2]["rewards/margins"][0]), rel=1e-4, abs=1e-5)


def test_train_script_with_gin_files_and_overrides(world, tmp_path):
    gin_file = tmp_path / "exp.gin"
    gin_file.write_text(f"""
include '{ROOT}/configs/models/tiny_llama.gin'
include '{ROOT}/configs/mesh/single_device.gin'
custom_model_config.vocab_size = {world["cfg"].vocab_size}
train.run_dir = '{tmp_path / "run"}'
train.objective = @SFT()
train.model_config = %MODEL_CONFIG
train.tokenizer = '{world["tok_dir"]}'
train.train_data = @sft_pipeline
train.num_steps = 4
LoopSettings.log_every = 2
sft_pipeline.data_dirs = '{world["demos"]}'
sft_pipeline.batch_size = 4
sft_pipeline.seq_len = 32
sft_pipeline.max_length = 32
sft_pipeline.max_prompt_length = 16
make_optimizer.name = 'rmsprop'
make_optimizer.learning_rate = 1e-4
""")
    env = dict(os.environ, XLA_FLAGS="")
    cmd = [
        sys.executable,
        "scripts/train.py",
        f"--gin_file={gin_file}",
        "--gin_param=train.num_steps=6",
        "--gin_param=SFT.reduction='mean'",
    ]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    op = (tmp_path / "run" / "operative_config.gin").read_text()
    assert "SFT.reduction = 'mean'" in op and "train.num_steps = 6" in op and "make_optimizer.name = 'rmsprop'" in op
    assert json.load(open(tmp_path / "run" / "summary.json"))["step"] == 6
    # A typo in a binding fails at start-up, naming it.
    bad = subprocess.run(
        cmd + ["--gin_param=make_optimizer.learnig_rate=1.0"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert bad.returncode != 0 and "learnig_rate" in bad.stderr


def test_precomputed_reference_records_train_like_a_reference_model(world, sft_run, tmp_path):
    from rlaif_jax.train.reference import precompute_reference_logps

    ref = os.path.join(sft_run[0], "hf")
    precompute_reference_logps(
        preferences_dir=world["prefs"],
        out_dir=str(tmp_path / "prefs_ref"),
        reference=ref,
        seq_len=32,
        max_length=32,
        max_prompt_length=16,
        batch_size=5,
    )
    from rlaif_jax.data.records import read_records

    recs = list(read_records(str(tmp_path / "prefs_ref")))
    assert all(r["ref_chosen_logp"] < 0 and r["ref_model"].startswith(os.path.abspath(ref)) for r in recs)
    outs = {}
    for mode, data in (("model", world["prefs"]), ("precomputed", str(tmp_path / "prefs_ref"))):
        run = tmp_path / mode
        train(
            run_dir=str(run),
            objective=DPO(beta=0.5, reference=mode),
            train_data=pref_data(data),
            num_steps=3,
            init_from=ref,
            optimizer=functools.partial(make_optimizer, learning_rate=1e-3),
            mesh=ONE_DEVICE,
            loop=LoopSettings(log_every=1),
        )
        outs[mode] = (read_jsonl(str(run / "metrics.jsonl")), load_file(str(run / "hf" / "model.safetensors")))
    (ma, pa), (mb, pb) = outs["model"], outs["precomputed"]
    for ra, rb in zip(ma, mb):
        assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-4, abs=1e-6)
        assert ra["rewards/margins"] == pytest.approx(rb["rewards/margins"], rel=1e-3, abs=1e-5)
    for k in pa:
        np.testing.assert_allclose(pa[k], pb[k], atol=1e-5)


def test_data_running_out_between_log_steps_still_logs_and_exports(world, tmp_path):
    out = train(
        run_dir=str(tmp_path),
        objective=SFT(),
        train_data=sft_data(world["demos"], num_epochs=1),
        num_steps=1000,
        model_config=world["cfg"],
        tokenizer=world["tok_dir"],
        mesh=ONE_DEVICE,
        loop=LoopSettings(log_every=100),
        optimizer=functools.partial(make_optimizer, learning_rate=1e-3),
    )
    rows = read_jsonl(str(tmp_path / "metrics.jsonl"))
    assert out["step"] == 4 and rows and rows[-1]["step"] == 4 and "loss" in rows[-1]
    assert (tmp_path / "hf" / "model.safetensors").exists()


def test_reference_from_keeps_another_model_as_the_dpo_reference(world, sft_run, tmp_path):
    """Iterative RLAIF starts round 2 from round 1's policy with the SFT model as the
    reference: reference_from must train exactly like reference log-probs precomputed under
    that model, and differently from the default (the start is the reference)."""
    from rlaif_jax.errors import ConfigError
    from rlaif_jax.train.reference import precompute_reference_logps

    sft = os.path.join(sft_run[0], "hf")
    args = dict(
        train_data=pref_data(world["prefs"]),
        optimizer=functools.partial(make_optimizer, learning_rate=1e-3),
        mesh=ONE_DEVICE,
        loop=LoopSettings(log_every=1),
    )
    train(run_dir=str(tmp_path / "round1"), objective=DPO(beta=0.5), num_steps=3, init_from=sft, **args)
    start = str(tmp_path / "round1" / "hf")
    precompute_reference_logps(
        preferences_dir=world["prefs"],
        out_dir=str(tmp_path / "prefs_ref"),
        reference=sft,
        seq_len=32,
        max_length=32,
        max_prompt_length=16,
        batch_size=8,
    )
    runs = {
        "reference_from": dict(objective=DPO(beta=0.5), reference_from=sft),
        "precomputed": dict(
            objective=DPO(beta=0.5, reference="precomputed"), train_data=pref_data(str(tmp_path / "prefs_ref"))
        ),
        "default": dict(objective=DPO(beta=0.5)),
    }
    rows = {}
    for name, kw in runs.items():
        train(run_dir=str(tmp_path / name), num_steps=2, init_from=start, **{**args, **kw})
        rows[name] = read_jsonl(str(tmp_path / name / "metrics.jsonl"))
    for a, b in zip(rows["reference_from"], rows["precomputed"]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4, abs=1e-6)
        assert a["rewards/chosen"] == pytest.approx(b["rewards/chosen"], rel=1e-3, abs=1e-5)
    assert abs(rows["reference_from"][0]["rewards/chosen"]) > 1e-3  # round 1 moved away from the SFT model
    assert abs(rows["default"][0]["rewards/chosen"]) < 1e-5  # the start itself is the reference
    with pytest.raises(ConfigError, match="train.reference_from.*keeps no reference"):
        train(
            run_dir=str(tmp_path / "bad"),
            num_steps=1,
            init_from=start,
            objective=DPO(reference="none"),
            reference_from=sft,
            **args,
        )
