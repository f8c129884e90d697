"""Fault injection, API half: a teacher stage killed with SIGKILL at seeded random points
against a server that also fails on its own (429 / 500 / resets / timeouts), and the API
cache on a disk that fills up. What must hold: no prompt is lost (each ends as a record
or an errors.jsonl line), the records equal an uninterrupted run's, and nothing paid for
is paid again, except answers in flight at a kill (at most max_concurrency each)."""

import json
import os
import random
import subprocess
import tempfile
import time

import pytest

from rlaif_jax.data.records import DEMONSTRATIONS, read_records
from rlaif_jax.feedback.cache import read_cache_lines, rescue_paths
from rlaif_jax.feedback.server.testing import EchoTeacher, FaultInjector, FaultRates
from rlaif_jax.feedback.stages import teacher_stage

# The feedback tests' fixtures (a fault-injecting server on 127.0.0.1, the test key) and helpers.
from tests.faults.disks import tmpfs
from tests.feedback.conftest import (  # noqa: F401
    KEY_ENV,
    SECRET,
    api_key,
    make_client,
    serve,
    stage_cmd,
    write_prompts_jsonl,
)

SEED = 20240917
CONCURRENCY = 4
CLIENT = (
    f"FeedbackClient.max_concurrency={CONCURRENCY}",
    "FeedbackClient.timeout_s=0.25",
    "FeedbackClient.backoff_base_s=0.01",
    "FeedbackClient.backoff_max_s=0.05",
    "FeedbackClient.max_attempts=12",
)


def _prompts(tmp_path, n):
    # Every 16th prompt can never succeed (a 400): it must end in errors.jsonl, not vanish.
    texts = [f"task {i}" + (" [[fault:400]]" if i % 16 == 5 else "") for i in range(n)]
    return texts, write_prompts_jsonl(tmp_path / "prompts.jsonl", texts)


def _outcome(out_dir):
    records = list(read_records(out_dir, DEMONSTRATIONS))
    with open(os.path.join(out_dir, "errors.jsonl")) as f:
        errors = [json.loads(line) for line in f]
    return records, errors


def _reference(serve, tmp_path, prompts):
    """The same stage, uninterrupted, against a server with only the prompts' own faults."""
    srv = serve(EchoTeacher(["teacher"]), FaultInjector())
    with make_client(srv, tmp_path, cache="api/ref.jsonl") as c:
        teacher_stage(prompts=prompts, out_dir=str(tmp_path / "ref"), client=c)
    return _outcome(tmp_path / "ref")


def _cache_lines(path) -> int:
    try:
        with open(path, "rb") as f:
            return f.read().count(b"\n")
    except FileNotFoundError:
        return 0


def test_kill_9_at_random_points_loses_no_prompt_and_repays_only_what_was_in_flight(serve, tmp_path, api_key):
    rng = random.Random(SEED)
    n = 48
    texts, prompts = _prompts(tmp_path, n)
    faults = FaultInjector(
        FaultRates(rate_429=0.05, rate_500=0.05, rate_reset=0.03, rate_slow=0.02),
        seed=SEED,
        retry_after_s=0.01,
        slow_s=0.4,
    )
    srv = serve(EchoTeacher(["teacher"], latency_s=0.03), faults)
    cache = tmp_path / "api" / "teacher.jsonl"
    cmd = stage_cmd(prompts, tmp_path / "out", cache, srv.url, *CLIENT)
    env = {**os.environ, KEY_ENV: SECRET, "JAX_PLATFORMS": "cpu"}
    first = rng.randint(6, 16)
    kill_at = [first, rng.randint(first + 10, 34)]  # cache lines written when the kill comes
    for k in kill_at:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 90
        while proc.poll() is None and _cache_lines(cache) < k and time.monotonic() < deadline:
            time.sleep(0.005)
        assert proc.poll() is None, f"finished before the kill at {k}: " + proc.stderr.read().decode()[-2000:]
        proc.kill()
        proc.communicate()
        assert not (tmp_path / "out" / "manifest.json").exists()
    done = subprocess.run(cmd, env=env, capture_output=True, timeout=120)
    assert done.returncode == 0, done.stderr.decode()[-3000:]

    records, errors = _outcome(tmp_path / "out")
    ids = {r["prompt_id"] for r in records} | {e["prompt_id"] for e in errors}
    assert len(ids) == n and len(records) + len(errors) == n  # no prompt lost, none twice
    assert sorted(e["kind"] for e in errors) == ["http_400"] * sum("[[fault:400]]" in t for t in texts)
    ref_records, ref_errors = _reference(serve, tmp_path, prompts)
    assert records == ref_records
    assert [e["prompt_id"] for e in errors] == [e["prompt_id"] for e in ref_errors]
    paid = faults.paid()
    assert len(paid) == n - len(errors)
    assert sum(k - 1 for k in paid.values()) <= CONCURRENCY * len(kill_at)
    assert {f for f in (e["fault"] for e in faults.log) if f} >= {"429", "500", "400"}  # the faults happened


def test_a_full_disk_under_the_cache_keeps_every_paid_answer(serve, tmp_path, api_key, monkeypatch):
    from rlaif_jax.cli import user_error_line
    from rlaif_jax.errors import StorageError

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    n = 40
    _, prompts = _prompts(tmp_path, n)
    faults = FaultInjector()
    srv = serve(EchoTeacher(["teacher"], latency_s=0.01), faults)
    with tmpfs(tmp_path / "disk", "64k") as disk:
        filler = disk / "filler"
        filler.write_bytes(b"\0" * 48 * 1024)  # 16 KiB left: room for about half the answers
        with make_client(srv, disk, cache="teacher.jsonl", max_concurrency=CONCURRENCY) as c:
            with pytest.raises(StorageError) as err:
                teacher_stage(prompts=prompts, out_dir=str(tmp_path / "out"), client=c)
            cache = c.cache.path
        line = user_error_line(err.value)
        assert line.startswith(f"{cache}: cannot save API answers (No space left on device [Errno 28])")
        assert f"in {rescue_paths(cache)[1]}" in line and "free space" in line
        assert not (tmp_path / "out" / "manifest.json").exists()
        paid_first = len(faults.paid())
        assert paid_first < n  # it stopped sending when the disk filled

        filler.unlink()  # space freed: the same command again
        with make_client(srv, disk, cache="teacher.jsonl", max_concurrency=CONCURRENCY) as c:
            assert c.cache.failure is None and len(c.cache) >= paid_first - 3  # - the 400s
            m = teacher_stage(prompts=prompts, out_dir=str(tmp_path / "out"), client=c)
        assert not any(os.path.exists(p) for p in rescue_paths(cache))
        assert len(read_cache_lines(cache)) >= n
    records, errors = _outcome(tmp_path / "out")
    assert m["num_records"] == len(records) == n - len(errors) and len(errors) == 3
    paid = faults.paid()
    assert len(paid) == len(records) and set(paid.values()) == {1}  # nothing paid for twice, or lost
