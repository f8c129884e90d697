"""Training under faults, through scripts/train.py as a user runs it: a run killed (kill -9)
mid-step, during an asynchronous checkpoint save and during the HF export, each time rerun
with the same command, ends bit-identical to an uninterrupted run with every metrics step
logged once; a full disk at a checkpoint is one error line and keeps the last checkpoint
(which the rerun resumes from, as after the kills).

Each launch pays the JAX import and a compile: few launches, the kill points found by
watching the run directory, and a persistent compilation cache.
"""

import functools
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

from rlaif_jax import sharding as shd
from rlaif_jax.train.checkpoint import TMP_MARKER, Checkpointer
from rlaif_jax.train.loop import train
from rlaif_jax.train.metrics import read_jsonl
from tests.faults.disks import tmpfs
from tests.train.fixtures import make_world

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ONE_DEVICE = functools.partial(shd.make_mesh, 1, 1, 1, devices=jax.devices()[:1])
STEPS, EVERY = 12, 4
SEED = 17  # the kill points


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tok, tok_dir, demos, _ = make_world(str(tmp_path_factory.mktemp("world")))
    return dict(vocab=len(tok), tok_dir=tok_dir, demos=demos)


@pytest.fixture(scope="module")
def straight(world, tmp_path_factory):
    """The uninterrupted run, trained in this process."""
    tmp = tmp_path_factory.mktemp("straight")
    _in_process(_gin(tmp, world, tmp / "run"), tmp / "run")
    return tmp / "run"


def _gin(tmp_path, world, run_dir, objective="SFT", pipeline="sft_pipeline", data=None, extra="", steps=STEPS) -> str:
    """The tiny run's gin file (`steps` steps, a checkpoint every EVERY): SFT on the
    demonstrations unless told another objective, its pipeline and data (`extra`: more lines)."""
    path = tmp_path / "run.gin"
    path.write_text(f"""
include '{ROOT}/configs/models/tiny_llama.gin'
include '{ROOT}/configs/mesh/single_device.gin'
custom_model_config.vocab_size = {world["vocab"]}
custom_model_config.hidden_size = 32
custom_model_config.intermediate_size = 64
train.run_dir = '{run_dir}'
train.objective = @{objective}()
train.model_config = %MODEL_CONFIG
train.tokenizer = '{world["tok_dir"]}'
train.train_data = @{pipeline}
train.num_steps = {steps}
LoopSettings.log_every = 1
LoopSettings.checkpoint_every = {EVERY}
{pipeline}.data_dirs = '{data or world["demos"]}'
{pipeline}.batch_size = 4
{pipeline}.seq_len = 32
{pipeline}.max_length = 32
{pipeline}.max_prompt_length = 16
{pipeline}.prefetch = 0
make_optimizer.learning_rate = 1e-3
{extra}""")
    return str(path)


def _in_process(gin_file, run_dir, **kw):
    """The same configuration, trained in this process (one of its fake devices)."""
    import gin

    from rlaif_jax.cli import import_configurables

    import_configurables()
    gin.clear_config()
    try:
        gin.parse_config_files_and_bindings([gin_file], [])
        return train(run_dir=str(run_dir), mesh=ONE_DEVICE, **kw)
    finally:
        gin.clear_config()


@pytest.fixture(autouse=True)
def no_orphans():
    """A launch still running after its test (a failed assertion) is killed."""
    yield
    while Launch.running:
        proc = Launch.running.pop()
        if proc.poll() is None:
            proc.kill()
            proc.wait()


class Launch:
    """scripts/train.py in the background; stderr (progress bar, logs) to a file."""

    running: list = []

    def __init__(self, gin_file, tmp_path, name):
        env = dict(
            os.environ,
            XLA_FLAGS="",
            JAX_PLATFORMS="cpu",
            JAX_COMPILATION_CACHE_DIR=os.path.join(tempfile.gettempdir(), "rlaif_jax_test_xla_cache"),
            JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
            JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1",
        )
        self.log = tmp_path / f"{name}.stderr"
        self._err = open(self.log, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "scripts/train.py", f"--gin_file={gin_file}"],
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=self._err,
        )
        Launch.running.append(self.proc)

    def stderr(self) -> str:
        return self.log.read_text(errors="replace")

    def kill_when(self, cond, timeout=240.0) -> None:
        """SIGKILL as soon as cond() holds (polled every millisecond or so)."""
        deadline = time.monotonic() + timeout
        while not cond():
            assert self.proc.poll() is None, f"exited before the kill point:\n{self.stderr()[-3000:]}"
            assert time.monotonic() < deadline, "kill point not reached"
            time.sleep(0.001)
        self.proc.send_signal(signal.SIGKILL)
        assert self.proc.wait(60) == -signal.SIGKILL
        self._err.close()

    def wait(self, timeout=240.0) -> int:
        rc = self.proc.wait(timeout)
        self._err.close()
        return rc


def _rows(run):
    path = run / "metrics.jsonl"
    return path.read_text().count("\n") if path.exists() else 0


def _steps_logged(path):
    lines = path.read_text().split("\n")[:-1] if path.exists() else []  # the last may be half-written
    return [int(re.match(r'{"step": (\d+)', ln).group(1)) for ln in lines]


def _logs_past(run, step):
    """A predicate: a launch started now has logged a step after `step`. A killed run's rows
    after it are dropped at the resume by an atomic rewrite (a new inode), so until then
    they do not count."""
    path = run / "metrics.jsonl"
    stale = any(s > step for s in _steps_logged(path))
    inode = path.stat().st_ino if path.exists() else None
    return lambda: (not stale or path.stat().st_ino != inode) and any(s > step for s in _steps_logged(path))


def _tmp_dirs(run):
    d = run / "checkpoints"
    return [n for n in os.listdir(d) if TMP_MARKER in n] if d.exists() else []


def _complete_steps(run):
    d = run / "checkpoints"
    return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if d.exists() else []


def test_killed_runs_resume_bit_identically(world, straight, tmp_path):
    rng = random.Random(SEED)
    run = tmp_path / "run"
    gin_file = _gin(tmp_path, world, run)

    # 1. Mid-step: after a seeded number of logged steps, once the first checkpoint is complete.
    first = Launch(gin_file, tmp_path, "1")
    k = rng.randint(EVERY + 1, 2 * EVERY - 1)
    first.kill_when(lambda: _rows(run) >= k and _complete_steps(run))
    assert not (run / "hf").exists()

    # 2. During an asynchronous checkpoint save: once this launch trains (so a killed save's
    # leftovers are cleaned up), the moment orbax's temporary directory for a step appears.
    resumed = max(_complete_steps(run))
    trained = _logs_past(run, resumed)
    second = Launch(gin_file, tmp_path, "2")
    second.kill_when(lambda: trained() and _tmp_dirs(run))
    half = [int(n.split(".")[0]) for n in _tmp_dirs(run)]
    assert half and max(_complete_steps(run)) < max(half), "a half-written step is never the latest"
    assert f"at step {resumed}" in second.stderr()

    # 3. During the HF export (written to hf.partial/, renamed to hf/ when whole).
    resumed = max(_complete_steps(run))
    third = Launch(gin_file, tmp_path, "3")
    third.kill_when(lambda: (run / "hf.partial").exists())
    assert f"at step {resumed}" in third.stderr() and max(_complete_steps(run)) == STEPS
    assert not (run / "hf").exists()

    # 4. The same command again: it only exports, from the final checkpoint.
    last = Launch(gin_file, tmp_path, "4")
    assert last.wait() == 0, last.stderr()[-3000:]
    assert f"at step {STEPS}" in last.stderr()

    a = load_file(str(straight / "hf" / "model.safetensors"))
    b = load_file(str(run / "hf" / "model.safetensors"))
    assert set(a) == set(b)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    steps = [r["step"] for r in read_jsonl(str(run / "metrics.jsonl"))]
    assert steps == [r["step"] for r in read_jsonl(str(straight / "metrics.jsonl"))]
    assert steps == list(range(1, STEPS + 1))
    assert not _tmp_dirs(run) and not (run / "hf.partial").exists() and not (run / "hf.old").exists()


@pytest.fixture
def tiny_disk(tmp_path):
    """A 16 MiB tmpfs (root only)."""
    with tmpfs(tmp_path / "disk", "16m") as mnt:
        yield mnt


def _fill(disk, leave: int) -> str:
    st = os.statvfs(disk)
    filler = os.path.join(disk, "filler")
    with open(filler, "wb") as f:
        f.write(b"\0" * max(st.f_bavail * st.f_frsize - leave, 0))
    return filler


def test_a_full_disk_at_a_checkpoint_is_one_error_and_keeps_the_last_one(world, straight, tmp_path, tiny_disk):
    run = tiny_disk / "run"
    gin_file = _gin(tmp_path, world, run)
    # A run preempted after its step-4 checkpoint (copied from the uninterrupted run).
    shutil.copytree(straight / "checkpoints" / str(EVERY), run / "checkpoints" / str(EVERY))
    _fill(tiny_disk, leave=64 << 10)  # room for the logs, not for a checkpoint
    full = Launch(gin_file, tmp_path, "full")
    assert full.wait() == 2, full.stderr()[-3000:]
    err = full.stderr()
    # Before: seven tracebacks ending in an unrelated ImportError, and a temporary directory left.
    assert "Traceback" not in err, err[-3000:]
    line = next(ln for ln in err.splitlines() if ln.startswith("error: "))
    assert re.search(
        rf"{run}/checkpoints: could not write the checkpoint of step {2 * EVERY} "
        rf"\(No space left on device\).*step {EVERY}, is intact.*rerun the same command",
        line,
    ), line
    assert not _tmp_dirs(run) and Checkpointer(str(run / "checkpoints")).latest_step() == EVERY
    assert not (run / "hf").exists()
