"""SIGINT (Ctrl-C) and SIGTERM (a TPU VM's preemption) in the middle of an API stage and of a
training run, sent to the script as a user's shell or the VM would: the process stops taking
new work, keeps what it has (the answers that arrived and those in flight; a checkpoint at
the current step), prints one `error:` line saying what was kept and exits 128 + the signal.
The rerun pays for nothing twice.

Every wait is bounded: a process that does not stop fails the test instead of hanging it."""

import os
import signal
import subprocess
import threading
import time

import pytest

from rlaif_jax.data.records import DEMONSTRATIONS, read_records
from rlaif_jax.feedback.cache import read_cache_lines
from rlaif_jax.feedback.server.testing import EchoTeacher, FaultInjector
from tests.feedback.conftest import (  # noqa: F401
    KEY_ENV,
    REPO,
    SECRET,
    api_key,
    serve,
    stage_cmd,
    write_prompts_jsonl,
)

CONCURRENCY = 4


def _cache_lines(path) -> int:
    try:
        with open(path, "rb") as f:
            return f.read().count(b"\n")
    except FileNotFoundError:
        return 0


def _one_error_line(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = [ln for ln in stderr.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1, stderr[-3000:]
    assert len(lines[0]) < 300, lines[0]
    return lines[0]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_mid_stage_keeps_every_answer_paid_for(serve, tmp_path, api_key, sig):
    n = 40
    prompts = write_prompts_jsonl(tmp_path / "prompts.jsonl", [f"task {i}" for i in range(n)])
    faults = FaultInjector()
    # Slow answers: when the signal comes, CONCURRENCY of them are in flight (paid for).
    srv = serve(EchoTeacher(["teacher"], latency_s=0.3), faults)
    cache = tmp_path / "api" / "teacher.jsonl"
    cmd = stage_cmd(
        prompts,
        tmp_path / "out",
        cache,
        srv.url,
        f"FeedbackClient.max_concurrency={CONCURRENCY}",
        "FeedbackClient.progress=False",
    )
    env = {**os.environ, KEY_ENV: SECRET, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 90
        while proc.poll() is None and _cache_lines(cache) < 2 * CONCURRENCY and time.monotonic() < deadline:
            time.sleep(0.01)
        assert proc.poll() is None, "finished before the signal: " + proc.stderr.read()[-2000:]
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)  # before the fix: a second traceback, or a hang
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 128 + sig, err[-3000:]
    line = _one_error_line(err)
    assert f"stopped by {signal.Signals(sig).name}" in line and str(cache) in line and "rerun" in line, line
    assert not (tmp_path / "out" / "manifest.json").exists()
    paid = len(faults.paid())
    assert 0 < paid < n
    # Every answer the server was paid for (the ones in flight included) is in the cache.
    assert len(read_cache_lines(str(cache))) == paid, (paid, line)

    if sig == signal.SIGINT:  # the rerun (once: the signal made no difference to the cache)
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-3000:]
        assert len(list(read_records(str(tmp_path / "out"), DEMONSTRATIONS))) == n
        assert set(faults.paid().values()) == {1} and len(faults.paid()) == n  # nothing paid twice


def test_sigterm_mid_training_checkpoints_the_current_step_and_exits_143(tmp_path, capsys):
    """A preemption: the run stops after the step under way, checkpoints it (the last
    checkpoint is older than LoopSettings.stop_checkpoint_after_min = 0) and exits 143.
    In this process (no second JAX start-up and compile): the signal comes from a thread
    watching metrics.jsonl; the run is 40 steps, so code that ignores it ends instead of
    hanging, and fails the test."""
    import gin

    from rlaif_jax.cli import main_with_gin, run
    from rlaif_jax.train.checkpoint import Checkpointer
    from rlaif_jax.train.loop import train
    from tests.faults.test_bad_input import sft_gin
    from tests.train.fixtures import make_world

    tok, tok_dir, demos, _ = make_world(str(tmp_path / "world"))
    world = dict(vocab=len(tok), tok_dir=tok_dir, demos=demos)
    run_dir = tmp_path / "run"
    extra = "train.num_steps = 40\nLoopSettings.log_every = 1\nLoopSettings.stop_checkpoint_after_min = 0"
    gin_file = sft_gin(tmp_path, run_dir, world, extra)
    metrics = run_dir / "metrics.jsonl"

    def preempt():
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            if metrics.exists() and metrics.read_text().count("\n") >= 3:
                os.kill(os.getpid(), signal.SIGTERM)
                return
            time.sleep(0.01)

    # Without a handler of the run's, SIGTERM would end pytest: ignored, the run goes on.
    before = signal.signal(signal.SIGTERM, lambda *a: None)
    watcher = threading.Thread(target=preempt, daemon=True)
    gin.clear_config()
    try:
        watcher.start()
        rc = run(lambda argv: main_with_gin("train", train, argv), [f"--gin_file={gin_file}"])
    finally:
        signal.signal(signal.SIGTERM, before)
        gin.clear_config()
    err = capsys.readouterr().err
    assert rc == 143, err[-3000:]  # before the fix: 0 (the signal ignored) or killed at once
    line = _one_error_line(err)
    step = Checkpointer(str(run_dir / "checkpoints")).latest_step()
    assert step is not None and 3 <= step < 40
    assert f"stopped by SIGTERM: at step {step}; the checkpoint of step {step} is in" in line, line
    assert "rerun the same command" in line
