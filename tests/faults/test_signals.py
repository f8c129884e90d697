"""SIGINT (Ctrl-C) and SIGTERM (a TPU VM's preemption) in the middle of an API stage and of a
training run, sent to the script as a user's shell or the VM would: the process stops taking
new work, keeps what it has (the answers that arrived and those in flight; a checkpoint at
the current step), prints one `error:` line saying what was kept and exits 128 + the signal.
The rerun pays for nothing twice.

Every wait is bounded: a process that does not stop fails the test instead of hanging it."""

import os
import signal
import subprocess
import time

import pytest

from rlaif_jax.data.records import DEMONSTRATIONS, read_records
from rlaif_jax.feedback.cache import read_cache_lines
from rlaif_jax.feedback.server.testing import EchoTeacher, FaultInjector
from tests.feedback.conftest import (  # noqa: F401
    KEY_ENV,
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

    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert len(list(read_records(str(tmp_path / "out"), DEMONSTRATIONS))) == n
    assert set(faults.paid().values()) == {1} and len(faults.paid()) == n  # nothing paid twice
