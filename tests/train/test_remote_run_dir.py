"""Training with run_dir on an object store (gs://, any fsspec URL), on fsspec's in-process
memory:// filesystem: no network.

orbax cannot write memory:// (etils.epath has no backend for it), so the checkpoints of a
memory:// run_dir are redirected to a local folder (the same one for the same URL, so
resume works); everything else the trainer writes goes through memory:// for real.
"""

import functools
import json
import os

import jax
import numpy as np
import pytest
from safetensors.numpy import load

from rlaif_jax import fileio
from rlaif_jax import sharding as shd
from rlaif_jax.train import SFT, make_optimizer, ppo
from rlaif_jax.train.loop import LoopSettings, NonFiniteLossError, train
from rlaif_jax.train.metrics import MetricsWriter, read_jsonl
from rlaif_jax.train.rundir import HF_EXPORT_MARKER, RunDir
from tests.train.fixtures import loop_args, make_world, sft_data, tiny_config

ONE_DEVICE = functools.partial(shd.make_mesh, 1, 1, 1, devices=jax.devices()[:1])
MEM = "memory://bucket/runs/sft"
LOCAL_LAYOUT = {"checkpoints", "config.gin", "hf", "metrics.jsonl", "operative_config.gin", "summary.json", "tb"}


@pytest.fixture(autouse=True)
def mem(memfs, memory_checkpoints):
    return memfs


@pytest.fixture(autouse=True)
def staging(tmp_path, monkeypatch):
    d = tmp_path / "staging"
    monkeypatch.setenv("RLAIF_STAGING_DIR", str(d))
    return d


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    tok, tok_dir, demos, _ = make_world(str(root))
    return dict(tok=tok, tok_dir=tok_dir, demos=demos, cfg=tiny_config(len(tok)), root=root)


def _args(world, run, **kw):
    args = dict(
        run_dir=run,
        objective=SFT(),
        train_data=sft_data(world["demos"]),
        num_steps=8,
        model_config=world["cfg"],
        tokenizer=world["tok_dir"],
        mesh=ONE_DEVICE,
        log_every=2,
        optimizer=functools.partial(make_optimizer, name="rmsprop", learning_rate=1e-3),
        checkpoint_every=4,
        export_hf=True,
    )
    args.update(kw)
    return loop_args(args)


def _remote_files(mem, url):
    root = fileio.url_fs(url)[1]
    return {p[len(root) :].lstrip("/") for p in mem.find(root)}


def test_remote_run_dir_gets_every_file_and_local_layout_is_unchanged(world, mem, tmp_path, staging, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing may land in a local folder named "memory:"
    local = tmp_path / "local"
    out_local = train(**_args(world, str(local)))
    out_remote = train(**_args(world, MEM))

    # The local layout is what it always was (no marker, no staging), plus the writer lock,
    # which for a URL run_dir is a machine-local file instead.
    assert set(os.listdir(local)) == LOCAL_LAYOUT | {".writer.lock"}
    assert HF_EXPORT_MARKER not in os.listdir(local / "hf")
    assert not (tmp_path / "memory:").exists()
    assert not list(staging.iterdir())  # staging is removed after its last upload

    files = _remote_files(mem, MEM)
    top = {f.split("/")[0] for f in files}
    assert top == LOCAL_LAYOUT - {"checkpoints"}  # checkpoints: redirected by the test (orbax)
    assert {f for f in files if f.startswith("hf/")} == {f"hf/{n}" for n in os.listdir(local / "hf")} | {
        f"hf/{HF_EXPORT_MARKER}"
    }
    assert any(f.startswith("tb/events.out.tfevents") for f in files)

    marker = json.loads(mem.cat(fileio.url_fs(f"{MEM}/hf/{HF_EXPORT_MARKER}")[1]))
    assert marker["step"] == 8
    assert marker["files"] == {n: os.path.getsize(local / "hf" / n) for n in os.listdir(local / "hf")}
    a = load((local / "hf" / "model.safetensors").read_bytes())
    b = load(mem.cat(fileio.url_fs(f"{MEM}/hf/model.safetensors")[1]))
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)

    summary = json.loads(mem.cat(fileio.url_fs(f"{MEM}/summary.json")[1]))
    assert summary["step"] == 8 and summary["loss"] == out_remote["loss"] == out_local["loss"]
    assert [r["step"] for r in read_jsonl(f"{MEM}/metrics.jsonl")] == [2, 4, 6, 8]
    for name in ("config.gin", "operative_config.gin"):
        assert mem.cat(fileio.url_fs(f"{MEM}/{name}")[1]).decode() == (local / name).read_text()


def test_preempted_remote_run_resumes_and_continues_metrics(world, mem, monkeypatch):
    # Preemption: the process dies after the step-4 checkpoint, so nothing in its `finally`
    # blocks runs (RunDir.close's last upload included). What reached the bucket is what
    # the checkpoint-time mirror uploaded.
    with monkeypatch.context() as m:
        m.setattr(RunDir, "close", lambda self: None)
        train(**_args(world, MEM, stop_after=5))
    files = _remote_files(mem, MEM)
    assert "config.gin" in files and not any(f.startswith("hf/") for f in files) and "summary.json" not in files
    first = read_jsonl(f"{MEM}/metrics.jsonl")
    assert [r["step"] for r in first] == [2, 4]

    out = train(**_args(world, MEM))  # relaunched: resumes from step 4
    rows = read_jsonl(f"{MEM}/metrics.jsonl")
    assert [r["step"] for r in rows] == [2, 4, 6, 8]
    assert rows[:2] == first  # continued, not overwritten
    assert f"hf/{HF_EXPORT_MARKER}" in _remote_files(mem, MEM)
    assert len([f for f in _remote_files(mem, MEM) if f.startswith("tb/events")]) == 2  # one per process run
    assert out["step"] == 8


def test_nonfinite_batch_dump_lands_in_the_remote_run_dir(world, mem):
    huge = functools.partial(make_optimizer, name="sgd", learning_rate=1e30, clip_norm=None)
    with pytest.raises(NonFiniteLossError, match=r"batch saved to memory://bucket/runs/sft/nonfinite_batch_step"):
        train(**_args(world, MEM, optimizer=huge, num_steps=12, log_every=4, checkpoint_every=2))
    files = _remote_files(mem, MEM)
    assert any(f.startswith("nonfinite_batch_step") and f.endswith(".npz") for f in files)
    assert "metrics.jsonl" in files and "summary.json" not in files


@pytest.mark.slow  # ~28 s; the remote layout and resume are checked for SFT above, PPO resume in test_ppo.py
def test_ppo_on_a_remote_run_dir_resumes_and_exports(world, mem, monkeypatch):
    from rlaif_jax.models import build_model, init_params
    from rlaif_jax.models.hf_io import save_hf
    from rlaif_jax.train.advantages import KLController

    policy = str(world["root"] / "policy")
    save_hf(policy, world["cfg"], init_params(build_model(world["cfg"]), jax.random.key(0)), tokenizer=world["tok"])
    config = ppo.PPOConfig(
        rollout_batch_size=8, mini_batch_size=4, ppo_epochs=1, max_new_tokens=4, max_prompt_length=16
    )
    kw = dict(
        run_dir=MEM,
        policy=policy,
        prompts=world["demos"],
        num_iterations=4,
        config=config,
        reward_fn=lambda tokens, positions, segs, rmask, P: rmask.sum(1) * 0.0,
        kl=KLController(init_coef=0.05),
        mesh=ONE_DEVICE,
        loop=LoopSettings(checkpoint_every=2),
    )
    with monkeypatch.context() as m:  # preempted after the iteration-2 checkpoint
        m.setattr(RunDir, "close", lambda self: None)
        ppo.train_ppo(stop_after=3, **kw)
    assert [r["step"] for r in read_jsonl(f"{MEM}/metrics.jsonl")] == [1, 2]
    ppo.train_ppo(**kw)
    assert [r["step"] for r in read_jsonl(f"{MEM}/metrics.jsonl")] == [1, 2, 3, 4]
    files = _remote_files(mem, MEM)
    assert {"summary.json", f"hf/{HF_EXPORT_MARKER}", "hf/model.safetensors", "hf/config.json"} <= files


def test_hf_dirs_on_an_object_store_are_fetched_once_and_errors_name_the_argument(world, mem, tmp_path, staging):
    """A base model uploaded to GCS (no marker of ours) is fetched to local disk once per
    host and trained from; a missing or partial directory fails naming the argument."""
    from rlaif_jax.train.ppo import train_ppo
    from rlaif_jax.train.reference import precompute_reference_logps

    local = tmp_path / "local_run"
    train(**_args(world, str(local), num_steps=2, checkpoint_every=0))
    mem.put(str(local / "hf"), "/bucket/models/base", recursive=True)
    base = "memory://bucket/models/base"
    for run in ("a", "b"):  # the second run reuses the first run's copy
        out = train(
            **_args(
                world,
                f"memory://bucket/runs/{run}",
                model_config=None,
                tokenizer=None,
                init_from=base,
                num_steps=2,
                checkpoint_every=0,
            )
        )
        assert np.isfinite(out["loss"])
    copies = os.listdir(staging / "rlaif_hf")
    assert len(copies) == 1 and os.path.exists(staging / "rlaif_hf" / copies[0] / "config.json")

    with pytest.raises(FileNotFoundError, match=r"init_from: memory://bucket/nothing: no config.json"):
        train(**_args(world, MEM, model_config=None, tokenizer=None, init_from="memory://bucket/nothing"))
    with pytest.raises(FileNotFoundError, match=r"tokenizer: memory://bucket/nothing: no tokenizer files"):
        train(**_args(world, MEM, tokenizer="memory://bucket/nothing"))
    mem.rm("/bucket/models/base/model.safetensors")
    with pytest.raises(FileNotFoundError, match=r"policy: memory://bucket/models/base: no .safetensors weights"):
        train_ppo(run_dir=MEM, policy=base, prompts="memory://b/prompts", num_iterations=1, reward_fn=lambda *a: 0.0)
    from rlaif_jax.data.records import PREFERENCES, write_records

    write_records(
        "memory://b/p",
        PREFERENCES,
        [{"prompt_id": "p", "prompt": "q", "chosen": "a", "rejected": "b", "provenance": "t"}],
    )  # the input is checked first
    with pytest.raises(FileNotFoundError, match=r"reference: memory://bucket/nothing"):
        precompute_reference_logps(
            preferences_dir="memory://b/p", out_dir="memory://b/q", reference="memory://bucket/nothing"
        )


def test_re_export_removes_the_old_marker_first(mem):
    rd = RunDir(MEM)
    rd.export_hf(lambda d: (os.makedirs(d), open(os.path.join(d, "config.json"), "w").write("{}")))
    assert fileio.exists(f"{MEM}/hf/{HF_EXPORT_MARKER}")

    def broken(d):
        raise OSError("disk full")

    with pytest.raises(OSError):
        rd.export_hf(broken)
    assert not fileio.exists(f"{MEM}/hf/{HF_EXPORT_MARKER}")  # an interrupted export is never "complete"
    rd.close()


def test_metrics_writer_on_a_url_appends_across_runs(mem):
    url = "memory://bucket/m"
    w = MetricsWriter(url)
    w.write(1, {"loss": 1.0})
    w.sync()
    assert [r["step"] for r in read_jsonl(f"{url}/metrics.jsonl")] == [1]
    w.write(2, {"loss": 0.5})
    w.close()
    w = MetricsWriter(url)
    w.write(3, {"loss": 0.25})
    w.close()
    assert [r["step"] for r in read_jsonl(f"{url}/metrics.jsonl")] == [1, 2, 3]
