"""The API client against a real fault-injecting HTTP server on 127.0.0.1."""

import asyncio
import json
import time

import pytest

from rlaif_jax.feedback.cache import ResultCache, read_cache_lines
from rlaif_jax.feedback.client import FeedbackError, parse_completion, parse_retry_after
from rlaif_jax.feedback.limits import RateLimiter, TokenBucket
from rlaif_jax.feedback.request import ChatRequest
from rlaif_jax.feedback.server.testing import EchoTeacher, FaultInjector, FaultRates

from .conftest import SECRET, make_client


def _reqs(client, texts, **params):
    return [client.request([{"role": "user", "content": t}], meta={"i": i}, **params) for i, t in enumerate(texts)]


@pytest.mark.parametrize("transport", ["aiohttp", "httpx"])
def test_every_fault_ends_in_a_result_or_a_recorded_error(serve, tmp_path, api_key, transport):
    faults = FaultInjector(retry_after_s=0.2, slow_s=1.5)
    srv = serve(EchoTeacher(), faults)
    client = make_client(srv, tmp_path, timeout_s=0.4, http_transport=transport)
    marks = [
        "",
        "[[fault:429x2]]",
        "[[fault:500x2]]",
        "[[fault:slowx1]]",
        "[[fault:badjsonx1]]",
        "[[fault:resetx1]]",
        "[[fault:400]]",
        "[[fault:401]]",
        "[[fault:500x99]]",
    ]
    t0 = time.monotonic()
    res = client.run(_reqs(client, [f"q{i} {m}" for i, m in enumerate(marks)], max_tokens=8))
    elapsed = time.monotonic() - t0
    st = {i: (r["status"], r["attempts"]) for i, r in enumerate(res)}
    assert st[0] == ("ok", 1)
    assert st[1] == ("ok", 3) and st[2] == ("ok", 3)
    assert st[3] == ("ok", 2) and st[4] == ("ok", 2) and st[5] == ("ok", 2)
    # 4xx that cannot succeed: one attempt, recorded with what and where.
    assert st[6] == ("error", 1) and res[6]["error"]["kind"] == "http_400" and res[6]["error"]["status"] == 400
    assert st[7] == ("error", 1) and res[7]["error"]["kind"] == "http_401"
    assert st[8] == ("error", client.max_attempts) and res[8]["error"]["kind"] == "server_error"
    # Retry-After of 0.2 s honoured twice for the 429 prompt.
    assert elapsed >= 0.4
    assert res[0]["response"]["choices"][0]["content"] == "Answer to: q0 "
    # the server saw exactly one send for each non-retryable error
    sends = {e["fault"]: 0 for e in faults.log}
    for e in faults.log:
        sends[e["fault"]] += 1
    assert sends["400"] == 1 and sends["401"] == 1
    # The 401 message echoed the Authorization header: the key must have been scrubbed.
    assert SECRET not in json.dumps(res) and "[REDACTED]" in res[7]["error"]["message"]
    s = client.summary
    assert (s.ok, s.errors, s.requests) == (6, 3, 9)
    assert s.retries_by_kind["rate_limited"] == 2 and s.retries_by_kind["timeout"] == 1
    assert s.retries_by_kind["malformed_response"] == 1 and s.retries_by_kind["connection"] == 1
    # cost: prices 2/4 USD per 1M tokens, from the usage the server reported
    u = res[0]["response"]["usage"]
    assert res[0]["cost_usd"] == pytest.approx((u["prompt_tokens"] * 2 + u["completion_tokens"] * 4) / 1e6)
    assert s.cost_usd == pytest.approx(sum(r.get("cost_usd") or 0 for r in res))


def test_random_faults_soak_then_rerun_pays_nothing(serve, tmp_path, api_key):
    faults = FaultInjector(
        FaultRates(rate_429=0.1, rate_500=0.1, rate_slow=0.03, rate_badjson=0.05, rate_reset=0.05),
        seed=3,
        retry_after_s=0.01,
        slow_s=0.6,
    )
    srv = serve(EchoTeacher(), faults)
    client = make_client(srv, tmp_path, timeout_s=0.3, max_attempts=12, max_concurrency=16)
    texts = [f"prompt number {i}" for i in range(80)]
    reqs = _reqs(client, texts, temperature=0.7)
    res = client.run(reqs)
    assert len(res) == 80 and all(r["status"] in ("ok", "error") for r in res)
    assert sum(r["status"] == "ok" for r in res) >= 78
    assert len({e["fault"] for e in faults.log} - {None}) >= 4  # the faults really happened
    ok_lines = [r for r in read_cache_lines(client.cache.path) if r["status"] == "ok"]
    assert len(ok_lines) == len({r["key"] for r in ok_lines})  # one paid line per request
    n_sends = len(faults.log)
    client.close()
    client2 = make_client(srv, tmp_path, retry_failed=False)
    res2 = client2.run(reqs)
    assert len(faults.log) == n_sends  # nothing sent again
    assert [r["key"] for r in res2] == [r["key"] for r in res]
    assert client2.summary.cached == 80 and client2.summary.cost_usd == 0


def test_restart_never_pays_twice(serve, tmp_path, api_key):
    faults = FaultInjector()
    srv = serve(EchoTeacher(), faults)
    c1 = make_client(srv, tmp_path)
    all_reqs = _reqs(c1, [f"p{i}" for i in range(30)])
    c1.run(all_reqs[:12])
    c1.close()
    first = {e["body"] for e in faults.log}
    c2 = make_client(srv, tmp_path)
    res = c2.run(all_reqs)
    second = [e["body"] for e in faults.log[len(first) :]]
    assert len(second) == 18 and not first & set(second)
    assert all(n == 1 for n in faults.paid().values())
    assert c2.summary.cached == 12 and c2.summary.ok == 18
    assert all(r["status"] == "ok" for r in res)


def test_identical_requests_in_one_run_are_sent_once(serve, tmp_path, api_key):
    faults = FaultInjector()
    srv = serve(EchoTeacher(), faults)
    c = make_client(srv, tmp_path)
    r = c.request([{"role": "user", "content": "same"}])
    out = c.run([r, r, r])
    assert len(faults.log) == 1 and len(out) == 3 and out[0] is out[2]


def test_cache_key_covers_model_params_template_not_meta():
    base = ChatRequest.make("m", [{"role": "user", "content": "x"}], template="t@1", meta={"a": 1}, temperature=0.0)
    same = ChatRequest.make("m", [{"role": "user", "content": "x"}], template="t@1", meta={"a": 2}, temperature=0.0)
    assert base.key == same.key
    for other in (
        ChatRequest.make("m2", [{"role": "user", "content": "x"}], template="t@1", temperature=0.0),
        ChatRequest.make("m", [{"role": "user", "content": "y"}], template="t@1", temperature=0.0),
        ChatRequest.make("m", [{"role": "user", "content": "x"}], template="t@2", temperature=0.0),
        ChatRequest.make("m", [{"role": "user", "content": "x"}], template="t@1", temperature=0.5),
        ChatRequest.make("m", [{"role": "user", "content": "x"}], template="t@1", temperature=0.0, n=2),
    ):
        assert other.key != base.key
    with pytest.raises(ValueError, match="message 0"):
        ChatRequest.make("m", [{"role": "bot", "content": "x"}])


def test_cache_survives_a_torn_last_line(tmp_path):
    p = tmp_path / "c.jsonl"
    with ResultCache(p) as c:
        c.put({"key": "a", "status": "ok", "v": 1})
        c.put({"key": "b", "status": "error", "error": {"kind": "x"}})
    with open(p, "ab") as f:
        f.write(b'{"key": "c", "status": "ok", "v"')  # kill -9 mid-write
    c = ResultCache(p)
    assert "a" in c and "b" not in c and "c" not in c and c.torn_lines == 1
    assert c.last_error("b")["error"]["kind"] == "x"
    c.put({"key": "c", "status": "ok", "v": 3})
    c.close()
    assert [r["key"] for r in read_cache_lines(p)] == ["a", "b", "c"]


def test_batch_api_same_records_half_price_and_resume(serve, tmp_path, api_key):
    faults = FaultInjector()
    srv = serve(EchoTeacher(), faults, batch_delay_s=0.3)
    online = make_client(srv, tmp_path, cache="online.jsonl")
    reqs = _reqs(online, [f"b{i}" for i in range(6)])
    ref = online.run(reqs)
    batch = make_client(srv, tmp_path, cache="batch.jsonl")
    # The first run submits, then is "killed" while the batch is still in progress.
    with pytest.raises(FeedbackError, match="still running"):
        batch.run_batch(reqs, poll_interval_s=0.05, max_wait_s=0.0)
    batch.close()
    from rlaif_jax.feedback.server.app import STATE_KEY

    state = srv.app[STATE_KEY]
    assert len(state["batches"]) == 1
    batch2 = make_client(srv, tmp_path, cache="batch.jsonl")
    out = batch2.run_batch(reqs, poll_interval_s=0.05)
    assert len(state["batches"]) == 1  # picked up the recorded batch, not resubmitted
    assert [r["response"]["choices"][0]["content"] for r in out] == [
        r["response"]["choices"][0]["content"] for r in ref
    ]
    assert all(r["mode"] == "batch" for r in out)
    for a, b in zip(out, ref):
        assert a["cost_usd"] == pytest.approx(b["cost_usd"] / 2)
    assert batch2.summary.cost_usd == pytest.approx(online.summary.cost_usd / 2)
    batch2.close()
    # A third run finds everything cached.
    batch3 = make_client(srv, tmp_path, cache="batch.jsonl")
    batch3.run_batch(reqs, poll_interval_s=0.05)
    assert len(state["batches"]) == 1 and batch3.summary.cached == 6


def test_missing_key_for_openai_is_a_clear_error(tmp_path, monkeypatch):
    from rlaif_jax.feedback.client import FeedbackClient

    monkeypatch.delenv("SOME_UNSET_KEY_VAR", raising=False)
    with pytest.raises(FeedbackError, match="SOME_UNSET_KEY_VAR"):
        FeedbackClient(model="gpt-4o", cache_path=str(tmp_path / "c.jsonl"), api_key_env="SOME_UNSET_KEY_VAR")


def test_token_bucket_rpm_and_tpm_with_a_fake_clock():
    t = [0.0]
    b = TokenBucket(per_minute=60, capacity=2, clock=lambda: t[0])  # 1 per second, burst 2
    assert b.wait_time(1) == 0
    b.take(1)
    b.take(1)
    assert b.wait_time(1) == pytest.approx(1.0)
    t[0] += 0.5
    assert b.wait_time(1) == pytest.approx(0.5)
    tok = TokenBucket(per_minute=6000, capacity=1000, clock=lambda: t[0])  # 100 tokens/s
    # bigger than the bucket: waits for a full bucket, then goes into debt
    assert tok.wait_time(5000) == 0
    tok.take(5000)
    assert tok.wait_time(10) == pytest.approx((10 + 4000) / 100)


def test_rate_limiter_paces_requests():
    async def go():
        lim = RateLimiter(rpm=600)  # 10/s, burst 100
        lim.requests.level = 0.0
        t0 = time.monotonic()
        for _ in range(5):
            await lim.acquire(1)
        return time.monotonic() - t0

    assert 0.4 <= asyncio.run(go()) < 1.5


def test_retry_after_and_response_parsing():
    assert parse_retry_after({"retry-after": "3"}) == 3.0
    assert parse_retry_after({"retry-after-ms": "250", "retry-after": "9"}) == 0.25
    assert parse_retry_after({}) is None
    with pytest.raises(ValueError, match="choices"):
        parse_completion({"id": "x"})
    with pytest.raises(ValueError, match=r"choices\[0\]"):
        parse_completion({"choices": [{"text": "hi"}]})
    ok = parse_completion(
        {
            "choices": [{"index": 0, "message": {"content": "hi"}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
        }
    )
    assert ok["choices"][0]["content"] == "hi" and ok["usage"]["total_tokens"] == 4


def test_batch_api_splits_files_and_records_per_request_errors(serve, tmp_path, api_key):
    from rlaif_jax.feedback.server.app import STATE_KEY

    srv = serve(EchoTeacher(["teacher"]))
    c = make_client(srv, tmp_path)
    reqs = _reqs(c, [f"x{i}" for i in range(5)])
    bad = ChatRequest.make("not-served", [{"role": "user", "content": "y"}])
    out = c.run_batch(reqs + [bad], poll_interval_s=0.02, max_requests_per_batch=4)
    assert len(srv.app[STATE_KEY]["batches"]) == 2
    assert [r["status"] for r in out] == ["ok"] * 5 + ["error"]
    assert out[-1]["error"]["kind"] == "batch_http_404" and "not-served" in out[-1]["error"]["message"]


def test_one_cache_file_cannot_be_shared_by_two_live_processes(tmp_path):
    import subprocess
    import sys

    a = ResultCache(tmp_path / "c.jsonl")
    ResultCache(tmp_path / "c.jsonl").close()  # same process: shared, and a's lock stays
    code = (
        "import sys; from rlaif_jax.feedback.cache import ResultCache\n"
        "try:\n    ResultCache(sys.argv[1])\nexcept RuntimeError as e:\n    print(e); sys.exit(3)\n"
    )
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "c.jsonl")], capture_output=True, text=True)
    assert r.returncode == 3 and "in use by another process" in r.stdout
    a.close()
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "c.jsonl")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


class _DiskFillsUp:
    """The cache's file on a disk with `room` bytes left: a short write, then ENOSPC, as
    the kernel reports a full disk."""

    def __init__(self, f, room: int):
        self._f, self.room = f, room

    def write(self, data):
        import errno
        import os

        if self.room <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        n = self._f.write(bytes(data[: self.room]))
        self.room -= n
        return n

    def __getattr__(self, name):
        return getattr(self._f, name)


def test_a_full_disk_loses_no_paid_answer_and_the_rerun_sends_only_the_rest(serve, tmp_path, api_key, monkeypatch):
    import collections
    import errno
    import os
    import tempfile

    from rlaif_jax.errors import StorageError
    from rlaif_jax.feedback import cache as cache_mod

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    faults = FaultInjector()
    srv = serve(EchoTeacher(latency_s=0.02), faults)
    client = make_client(srv, tmp_path, cache="api/c.jsonl", max_concurrency=4)
    reqs = _reqs(client, [f"question {i}" for i in range(40)])
    client.cache._f = _DiskFillsUp(client.cache._f, room=3000)
    real_append = cache_mod.append_whole

    def full_beside_the_cache(path, data):  # the rescue beside the cache is on the full disk too
        if path.startswith(str(tmp_path / "api")):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_append(path, data)

    monkeypatch.setattr(cache_mod, "append_whole", full_beside_the_cache)
    with pytest.raises(StorageError) as err:
        client.run(reqs)
    msg = str(err.value)
    rescue = cache_mod.rescue_paths(client.cache.path)[1]
    assert msg.startswith(f"{client.cache.path}: cannot save API answers (No space left on device [Errno 28])")
    assert f"in {rescue}" in msg and "free space on that disk and rerun" in msg and "\n" not in msg
    paid_first = faults.paid()
    assert 3 < len(paid_first) < 40  # it stopped sending once the cache failed
    saved = [r for r in read_cache_lines(client.cache.path) if r["status"] == "ok"]
    rescued = [r for r in read_cache_lines(rescue) if r["status"] == "ok"]
    assert rescued and len(saved) + len(rescued) == len(paid_first) and f"kept {len(rescued)} paid answers" in msg
    assert {r["key"] for r in saved}.isdisjoint(r["key"] for r in rescued)
    client.close()
    monkeypatch.setattr(cache_mod, "append_whole", real_append)

    # space freed: the next client merges the rescued answers and pays only for the rest
    again = make_client(srv, tmp_path, cache="api/c.jsonl", max_concurrency=4)
    assert not os.path.exists(rescue) and len(again.cache) == len(paid_first)
    res = again.run(reqs)
    assert all(r["status"] == "ok" for r in res) and again.summary.cached == len(paid_first)
    paid = faults.paid()
    assert len(paid) == 40 and set(paid.values()) == {1}  # each answer paid for exactly once
    assert collections.Counter(r["key"] for r in read_cache_lines(again.cache.path)) == collections.Counter(
        r.key for r in reqs
    )
    again.close()


def test_client_settings_are_checked_naming_the_binding(tmp_path):
    import gin

    from rlaif_jax.errors import ConfigError
    from rlaif_jax.feedback.client import FeedbackClient

    base = dict(model="m", cache_path=str(tmp_path / "c.jsonl"), base_url="http://127.0.0.1:9")
    for kw, match in [
        (dict(max_concurrency=0), r"FeedbackClient.max_concurrency = 0: must be a whole number >= 1"),
        (dict(max_attempts=0), r"FeedbackClient.max_attempts = 0"),
        (dict(requests_per_minute=0), r"FeedbackClient.requests_per_minute = 0: .*None for no limit"),
        (dict(tokens_per_minute=-1.0), r"FeedbackClient.tokens_per_minute = -1.0"),
        (dict(timeout_s=0), r"FeedbackClient.timeout_s = 0"),
        (dict(http_transport="curl"), r"FeedbackClient.http_transport = 'curl': must be one of"),
        (dict(cache_path="gs://b/c.jsonl"), r"FeedbackClient.cache_path = 'gs://b/c.jsonl'"),
    ]:
        with pytest.raises(ConfigError, match=match):
            FeedbackClient(**{**base, **kw})
    with gin.config_scope("critic"):  # a scoped reference (@critic/FeedbackClient) is named as bound
        with pytest.raises(ConfigError, match=r"^critic/FeedbackClient.max_attempts = 0"):
            FeedbackClient(**{**base, "max_attempts": 0})
    assert not (tmp_path / "c.jsonl").exists()


def test_a_full_disk_while_collecting_a_batch_keeps_its_results(serve, tmp_path, api_key, monkeypatch):
    import tempfile

    from rlaif_jax.errors import StorageError
    from rlaif_jax.feedback.server.app import STATE_KEY

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    srv = serve(EchoTeacher())
    c = make_client(srv, tmp_path, cache="batch.jsonl")
    reqs = _reqs(c, [f"b{i}" for i in range(6)])
    c.cache._f = _DiskFillsUp(c.cache._f, room=600)
    with pytest.raises(StorageError, match=r"kept \d paid answers in .*batch.jsonl.unsaved.jsonl"):
        c.run_batch(reqs, poll_interval_s=0.02)
    c.close()
    again = make_client(srv, tmp_path, cache="batch.jsonl")
    out = again.run_batch(reqs, poll_interval_s=0.02)
    assert [r["status"] for r in out] == ["ok"] * 6 and again.summary.cached == 6
    assert len(srv.app[STATE_KEY]["batches"]) == 1  # the batch paid for once, never resubmitted
