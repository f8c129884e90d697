"""Offline chat-completions client for any OpenAI-compatible endpoint: concurrency,
requests/tokens-per-minute limits, retries, a resumable disk cache, the Batch API, and
token/dollar accounting.

Retries are ours, not the openai package's (it is built with max_retries=0): we need one
policy that honours Retry-After across all workers (a 429 pauses the shared limiter),
treats a 200 with an unparseable body as retryable, and records every give-up with the
attempt count. Backoff is exponential with "equal jitter" (half fixed, half random), so
workers that failed together do not retry together.

Every result, success or final error, is one line in the cache (see cache.py). A result
line holds: key, status ("ok" / "error"), model, mode ("online" / "batch"), response
{id, choices [{index, content, finish_reason, logprobs}], usage}, cost_usd, attempts,
error {kind, status, message}, meta (the caller's bookkeeping), and timings.
The API key is read from the environment when the client is built, kept only inside the
openai client, and scrubbed from any error text before it is logged or stored.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import email.utils
import io
import json
import logging
import os
import random
import time
from typing import Any, Mapping, Optional, Sequence

import gin
import openai
from tqdm.auto import tqdm

from rlaif_jax.errors import ConfigError, StorageError, binding, non_negative, one_of, positive, whole
from rlaif_jax.feedback.cache import ResultCache, append_whole, rescue_paths
from rlaif_jax.feedback.limits import RateLimiter
from rlaif_jax.feedback.pricing import BATCH_DISCOUNT, cost_usd, price_for
from rlaif_jax.feedback.request import ChatRequest
from rlaif_jax.interrupt import Stop, graceful

log = logging.getLogger(__name__)

# 408 timeout, 409 conflict (OpenAI uses it for transient lock contention), 429, 5xx.
RETRYABLE_STATUS = frozenset({408, 409, 429})
REDACTED = "[REDACTED]"


class FeedbackError(RuntimeError):
    """A configuration or protocol problem that stops a run (not a per-request failure)."""


class MissingKeyError(FeedbackError, ConfigError):
    """The environment variable FeedbackClient.api_key_env names is not set."""


@dataclasses.dataclass
class Summary:
    """Accounting of one run (or of a whole stage, by adding runs)."""

    requests: int = 0
    cached: int = 0
    ok: int = 0
    errors: int = 0
    attempts: int = 0
    retries: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    unpriced_requests: int = 0
    elapsed_s: float = 0.0
    errors_by_kind: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    retries_by_kind: collections.Counter = dataclasses.field(default_factory=collections.Counter)

    def add_result(self, rec: Mapping[str, Any], cached: bool) -> None:
        self.requests += 1
        if cached:
            self.cached += 1
            return
        self.attempts += int(rec.get("attempts", 1))
        if rec["status"] == "ok":
            self.ok += 1
            u = rec.get("response", {}).get("usage") or {}
            self.prompt_tokens += int(u.get("prompt_tokens") or 0)
            self.completion_tokens += int(u.get("completion_tokens") or 0)
            if rec.get("cost_usd") is None:
                self.unpriced_requests += 1
            else:
                self.cost_usd += rec["cost_usd"]
        else:
            self.errors += 1
            self.errors_by_kind[rec["error"]["kind"]] += 1

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["errors_by_kind"] = dict(sorted(self.errors_by_kind.items()))
        d["retries_by_kind"] = dict(sorted(self.retries_by_kind.items()))
        d["cost_usd"] = round(self.cost_usd, 6)
        d["requests_per_s"] = round(self.requests / self.elapsed_s, 3) if self.elapsed_s else None
        return d

    def merge(self, other: "Summary") -> "Summary":
        for f in dataclasses.fields(self):
            a, b = getattr(self, f.name), getattr(other, f.name)
            setattr(self, f.name, a + b)
        return self

    def line(self) -> str:
        err = ", ".join(f"{k}={v}" for k, v in sorted(self.errors_by_kind.items())) or "none"
        unpriced = f" (+{self.unpriced_requests} unpriced)" if self.unpriced_requests else ""
        return (
            f"{self.requests} requests: {self.cached} cached, {self.ok} new ok, {self.errors} errors ({err}); "
            f"{self.retries} retries; tokens in/out {self.prompt_tokens}/{self.completion_tokens}; "
            f"${self.cost_usd:.4f}{unpriced}; {self.elapsed_s:.1f}s"
        )


class _Failure(Exception):
    def __init__(
        self,
        kind: str,
        message: str,
        status: Optional[int] = None,
        retryable: bool = False,
        retry_after: Optional[float] = None,
    ):
        super().__init__(message)
        self.kind, self.message, self.status = kind, message, status
        self.retryable, self.retry_after = retryable, retry_after


def parse_retry_after(headers: Optional[Mapping[str, str]]) -> Optional[float]:
    """Seconds from retry-after-ms, or Retry-After as seconds or an HTTP date."""
    if not headers:
        return None
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            return max(0.0, float(ms) / 1000.0)
        except ValueError:
            pass
    ra = headers.get("retry-after")
    if not ra:
        return None
    try:
        return max(0.0, float(ra))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(ra)
        return max(0.0, when.timestamp() - time.time())
    except (TypeError, ValueError):
        return None


def parse_completion(body: Any) -> dict:
    """The parts of a chat.completion body we keep; raises ValueError naming what is wrong."""
    if not isinstance(body, dict):
        raise ValueError(f"response body is {type(body).__name__}, not a JSON object")
    choices = body.get("choices")
    if not isinstance(choices, list) or not choices:
        raise ValueError("response has no 'choices' list")
    out = []
    for i, ch in enumerate(choices):
        msg = ch.get("message") if isinstance(ch, dict) else None
        if not isinstance(msg, dict):
            raise ValueError(f"choices[{i}] has no 'message' object")
        content = msg.get("content")
        if content is not None and not isinstance(content, str):
            raise ValueError(f"choices[{i}].message.content is {type(content).__name__}, not a string")
        out.append(
            {
                "index": int(ch.get("index", i)),
                "content": content if content is not None else "",
                "finish_reason": ch.get("finish_reason"),
                "logprobs": ch.get("logprobs"),
            }
        )
    usage = body.get("usage") or {}
    if not isinstance(usage, dict):
        raise ValueError("response 'usage' is not an object")
    return {
        "id": body.get("id"),
        "model": body.get("model"),
        "choices": sorted(out, key=lambda c: c["index"]),
        "usage": {k: usage.get(k) for k in ("prompt_tokens", "completion_tokens", "total_tokens")},
    }


@gin.configurable
class FeedbackClient:
    """Sends ChatRequests to one OpenAI-compatible endpoint with caching and limits.

    base_url: e.g. "https://api.openai.com/v1", a vLLM server, a gateway, or our own
      `rlaif_jax.feedback.server`. api_key_env names the environment variable holding the
      key (the key itself is never a parameter, so it cannot land in a saved config).
    prices: {model: (usd_in_per_1M, usd_out_per_1M)}; default pricing.DEFAULT_PRICES.
    """

    def __init__(
        self,
        model: str = gin.REQUIRED,
        cache_path: str = gin.REQUIRED,
        base_url: Optional[str] = None,
        api_key_env: str = "OPENAI_API_KEY",
        max_concurrency: int = 16,
        requests_per_minute: Optional[float] = None,
        tokens_per_minute: Optional[float] = None,
        max_attempts: int = 8,
        timeout_s: float = 120.0,
        backoff_base_s: float = 1.0,
        backoff_max_s: float = 60.0,
        max_retry_after_s: float = 600.0,
        stop_grace_s: float = 10.0,
        prices: Optional[Mapping[str, Sequence[float]]] = None,
        progress: bool = True,
        fsync_interval_s: float = 0.25,
        retry_failed: bool = True,
        http_transport: str = "aiohttp",
    ):
        # Named as bound: a client is usually a scoped reference (@critic/FeedbackClient).
        whole(binding("FeedbackClient.max_concurrency"), max_concurrency, 1)
        whole(binding("FeedbackClient.max_attempts"), max_attempts, 1)
        for name, value in (("requests_per_minute", requests_per_minute), ("tokens_per_minute", tokens_per_minute)):
            positive(binding(f"FeedbackClient.{name}"), value, "None for no limit")
        positive(binding("FeedbackClient.timeout_s"), timeout_s)
        for name, value in (
            ("backoff_base_s", backoff_base_s),
            ("backoff_max_s", backoff_max_s),
            ("max_retry_after_s", max_retry_after_s),
            ("stop_grace_s", stop_grace_s),
            ("fsync_interval_s", fsync_interval_s),
        ):
            non_negative(binding(f"FeedbackClient.{name}"), value)
        one_of(binding("FeedbackClient.http_transport"), http_transport, ("aiohttp", "httpx"))
        self.model = model
        self.base_url = base_url
        self.api_key_env = api_key_env
        self.max_concurrency = max_concurrency
        self.rpm, self.tpm = requests_per_minute, tokens_per_minute
        self.max_attempts = max_attempts
        self.timeout_s = timeout_s
        self.backoff_base_s, self.backoff_max_s = backoff_base_s, backoff_max_s
        self.max_retry_after_s = max_retry_after_s
        # After SIGINT / SIGTERM, how long the answers in flight (already paid for) are
        # waited for before they are dropped.
        self.stop_grace_s = stop_grace_s
        self.prices = {k: tuple(v) for k, v in prices.items()} if prices is not None else None
        self.progress = progress
        self.retry_failed = retry_failed
        self.http_transport = http_transport
        self._key = os.environ.get(api_key_env) or ""
        if not self._key:
            if base_url is None:
                raise MissingKeyError(
                    f"environment variable {api_key_env} ({binding('FeedbackClient.api_key_env')}) "
                    "is not set; export the API key there, or set "
                    f"{binding('FeedbackClient.base_url')} to a server that needs none"
                )
            log.info("%s is not set; sending requests to %s without a key", api_key_env, base_url)
        self.cache = ResultCache(cache_path, fsync_interval_s=fsync_interval_s)
        # The HTTP library logs every request at INFO: 100k lines that bury the progress bar
        # and the warnings that matter. Left alone if someone set its level on purpose.
        for name in ("httpx", "httpx2"):
            lg = logging.getLogger(name)
            if lg.level == logging.NOTSET:
                lg.setLevel(logging.WARNING)
        self._oai: Optional[openai.AsyncOpenAI] = None
        self.summary = Summary()

    # -- plumbing ------------------------------------------------------------------------

    def _client(self) -> openai.AsyncOpenAI:
        # Built per event loop: an httpx pool is bound to the loop it was created in.
        if self._oai is None:
            httpx = _httpx()
            # One pooled, kept-alive connection per worker (the default keeps only 100
            # alive, so 256 workers would keep reconnecting).
            limits = httpx.Limits(
                max_connections=self.max_concurrency + 8, max_keepalive_connections=self.max_concurrency + 8
            )
            http = None
            if self.http_transport == "aiohttp":
                # openai's aiohttp transport: httpx's own pool scans every connection for
                # every request, which costs more CPU than the rest of the client at c >= 64.
                try:
                    http = openai.DefaultAioHttpClient(limits=limits, timeout=self.timeout_s)
                except (AttributeError, RuntimeError) as e:
                    log.warning("openai's aiohttp transport is unavailable (%s); using httpx", e)
            if http is None:
                http = openai.DefaultAsyncHttpxClient(limits=limits, timeout=self.timeout_s)
            self._oai = openai.AsyncOpenAI(
                api_key=self._key or "no-key",
                base_url=self.base_url,
                max_retries=0,
                timeout=self.timeout_s,
                http_client=http,
            )
        return self._oai

    def redact(self, text: str) -> str:
        text = str(text)
        if self._key and len(self._key) >= 4:
            text = text.replace(self._key, REDACTED)
        return text

    def describe(self) -> dict:
        """Provenance for manifests: no key, only the name of its variable."""
        return {
            "model": self.model,
            "base_url": self.base_url or "https://api.openai.com/v1",
            "api_key_env": self.api_key_env,
            "max_concurrency": self.max_concurrency,
            "requests_per_minute": self.rpm,
            "tokens_per_minute": self.tpm,
            "max_attempts": self.max_attempts,
            "timeout_s": self.timeout_s,
            "price_usd_per_1M": price_for(self.model, self.prices),
        }

    def request(
        self,
        messages: Sequence[Mapping[str, str]],
        template: str = "",
        meta: Optional[Mapping[str, Any]] = None,
        **params,
    ) -> ChatRequest:
        return ChatRequest.make(self.model, messages, template=template, meta=meta, **params)

    def _backoff(self, attempt: int) -> float:
        d = min(self.backoff_max_s, self.backoff_base_s * (2**attempt))
        return d / 2 + random.uniform(0, d / 2)

    def _price(self, model: str):
        return price_for(model, self.prices)

    def _ok_record(self, req: ChatRequest, parsed: dict, attempts: int, latency: float, mode: str) -> dict:
        discount = BATCH_DISCOUNT if mode == "batch" else 1.0
        return {
            "key": req.key,
            "status": "ok",
            "model": req.model,
            "mode": mode,
            "template": req.template,
            "meta": req.meta_dict,
            "response": parsed,
            "cost_usd": cost_usd(parsed["usage"] or {}, self._price(req.model), discount),
            "attempts": attempts,
            "latency_s": round(latency, 4),
            "finished_unix": round(time.time(), 3),
        }

    def _error_record(self, req: ChatRequest, f: _Failure, attempts: int, mode: str) -> dict:
        return {
            "key": req.key,
            "status": "error",
            "model": req.model,
            "mode": mode,
            "template": req.template,
            "meta": req.meta_dict,
            "error": {"kind": f.kind, "status": f.status, "message": self.redact(f.message)[:2000]},
            "attempts": attempts,
            "finished_unix": round(time.time(), 3),
        }

    # -- one request ---------------------------------------------------------------------

    async def _send(self, req: ChatRequest) -> dict:
        try:
            # The client's generic post (openai's way to reach any endpoint) with the body as
            # built: the typed `chat.completions.create` re-validates every param through
            # pydantic, which costs more CPU per request than the HTTP exchange itself, and
            # would reject fields a non-OpenAI server accepts.
            raw = await self._client().post(
                "/chat/completions", cast_to=_httpx().Response, body=req.body(), options={"timeout": self.timeout_s}
            )
        except openai.APIConnectionError as e:  # includes APITimeoutError
            kind, root = _transport_failure(e)
            msg = f"no response within {self.timeout_s}s" if kind == "timeout" else f"{type(root).__name__}: {root}"
            raise _Failure(kind, msg, retryable=True) from e
        except openai.APIStatusError as e:
            s = e.status_code
            retryable = s in RETRYABLE_STATUS or s >= 500
            kind = "rate_limited" if s == 429 else "server_error" if s >= 500 else f"http_{s}"
            msg = f"HTTP {s}: {_error_text(e)}"
            raise _Failure(kind, msg, s, retryable, parse_retry_after(e.response.headers)) from e
        data = await raw.aread()
        try:
            parsed = parse_completion(json.loads(data))
        except ValueError as e:  # JSONDecodeError is a ValueError
            raise _Failure(
                "malformed_response", f"{e}; body starts {data[:200]!r}", raw.status_code, retryable=True
            ) from e
        return parsed

    async def complete(self, req: ChatRequest, limiter: Optional[RateLimiter] = None) -> tuple[dict, bool]:
        """(result record, whether it came from the cache). Never raises for API failures:
        they come back as an error record (also written to the cache)."""
        hit = self.cache.get(req.key)
        if hit is not None:
            return hit, True
        if not self.retry_failed and self.cache.last_error(req.key) is not None:
            return self.cache.last_error(req.key), True
        limiter = limiter or RateLimiter(self.rpm, self.tpm)
        reserve = req.estimated_tokens()
        t0 = time.monotonic()
        failure = None
        attempt = 0
        for attempt in range(1, self.max_attempts + 1):
            await limiter.acquire(reserve)
            try:
                parsed = await self._send(req)
            except _Failure as f:
                limiter.settle(reserve, 0)
                failure = f
                if not f.retryable or attempt == self.max_attempts:
                    break
                self.summary.retries += 1
                self.summary.retries_by_kind[f.kind] += 1
                if f.retry_after is not None:
                    wait = min(f.retry_after, self.max_retry_after_s)
                    if f.status == 429:
                        limiter.pause(wait)
                    wait += random.uniform(0, 0.1 * wait)
                else:
                    wait = self._backoff(attempt - 1)
                log.debug("request %s attempt %d: %s; retrying in %.2fs", req.key[:12], attempt, f.kind, wait)
                await asyncio.sleep(wait)
                continue
            u = parsed["usage"] or {}
            limiter.settle(reserve, (u.get("total_tokens") or None))
            rec = self._ok_record(req, parsed, attempt, time.monotonic() - t0, "online")
            self.cache.put(rec)
            return rec, False
        rec = self._error_record(req, failure, attempt, "online")
        log.warning("request %s failed after %d attempt(s): %s", req.key[:12], attempt, rec["error"]["message"][:300])
        self.cache.put(rec)
        return rec, False

    # -- many requests -------------------------------------------------------------------

    async def run_async(
        self, requests: Sequence[ChatRequest], desc: str = "requests", stop: Optional[Stop] = None
    ) -> list[dict]:
        """Results in the order of `requests`; identical requests are sent once. When `stop`
        is raised (SIGINT / SIGTERM, see rlaif_jax.interrupt), no new request is sent, the
        answers in flight get stop_grace_s to arrive (and be cached), and Interrupted says
        what was kept."""
        unique: dict[str, ChatRequest] = {}
        for r in requests:
            unique.setdefault(r.key, r)
        results: dict[str, dict] = {}
        summary = Summary()
        limiter = RateLimiter(self.rpm, self.tpm)
        queue: asyncio.Queue = asyncio.Queue()
        for r in unique.values():
            queue.put_nowait(r)
        bar = tqdm(total=len(unique), desc=desc, unit="req", disable=not self.progress, dynamic_ncols=True)
        t0 = time.monotonic()

        async def worker():
            while True:
                if self.cache.failed:
                    return  # an answer could not be saved: pay for no more of them
                if stop is not None and stop.requested:
                    return
                try:
                    r = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                rec, cached = await self.complete(r, limiter)
                results[r.key] = rec
                summary.add_result(rec, cached)
                bar.update(1)
                bar.set_postfix(cached=summary.cached, err=summary.errors, usd=f"{summary.cost_usd:.4f}", refresh=False)

        n_workers = min(self.max_concurrency, max(1, len(unique)))
        retries0 = self.summary.retries
        dropped = 0
        try:
            dropped = await self._work([asyncio.ensure_future(worker()) for _ in range(n_workers)], stop, desc)
        finally:
            bar.close()
            summary.elapsed_s = time.monotonic() - t0
            summary.retries = self.summary.retries - retries0
            self._fold(summary)
            self.cache.sync()
            await self._aclose()
        log.info("%s: %s", desc, summary.line())
        self.cache.raise_if_failed()
        if stop is not None and stop.requested:
            raise stop.interrupted(
                f"{len(results)} of {len(unique)} answers are saved in {self.cache.path}"
                + (f" ({dropped} in flight were dropped)" if dropped else "")
                + "; rerun the same command to send the rest (the saved ones are not paid again)"
            )
        return [results[r.key] for r in requests]

    async def _work(self, tasks: list, stop: Optional[Stop], desc: str) -> int:
        """Waits for the workers; after a stop, grants the requests in flight stop_grace_s
        and cancels the rest. Returns how many were cancelled."""
        pending = set(tasks)
        try:
            while pending and not (stop is not None and stop.requested):
                done, pending = await asyncio.wait(pending, timeout=0.05, return_when=asyncio.FIRST_EXCEPTION)
                for t in done:
                    t.result()  # a worker's bug: raised here, the others cancelled below
            if pending:
                log.warning(
                    "%s: stopping; waiting up to %.0fs for %d answers in flight", desc, self.stop_grace_s, len(pending)
                )
                deadline = time.monotonic() + self.stop_grace_s
                while pending and time.monotonic() < deadline:
                    _, pending = await asyncio.wait(pending, timeout=0.05)
            return len(pending)
        finally:
            for t in pending:
                t.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

    def _fold(self, s: Summary) -> None:
        retries, rbk = self.summary.retries, self.summary.retries_by_kind
        self.summary.merge(dataclasses.replace(s, retries=0, retries_by_kind=collections.Counter()))
        self.summary.retries, self.summary.retries_by_kind = retries, rbk

    async def _aclose(self) -> None:
        if self._oai is not None:
            try:
                await self._oai.close()
            finally:
                self._oai = None

    def run(self, requests: Sequence[ChatRequest], desc: str = "requests") -> list[dict]:
        with graceful() as stop:
            return asyncio.run(self.run_async(requests, desc, stop))

    # -- Batch API -----------------------------------------------------------------------

    def _batch_state_path(self) -> str:
        return self.cache.path + ".batches.jsonl"

    def _batch_state_paths(self) -> list[str]:
        """The state file, then its fallback under the temp directory (for a full disk)."""
        return [self._batch_state_path(), rescue_paths(self._batch_state_path())[1]]

    def _read_batch_state(self) -> dict[str, dict]:
        state: dict[str, dict] = {}
        for path in self._batch_state_paths():
            if not os.path.exists(path):
                continue
            with open(path) as f:
                for line in f:
                    try:
                        rec = json.loads(line)
                    except ValueError:
                        continue
                    state.setdefault(rec["batch_id"], {}).update(rec)
        return state

    def _append_batch_state(self, rec: dict) -> None:
        """A submitted batch is paid for: its id must survive a full disk, or a rerun would
        submit (and pay for) the same requests again."""
        data = (json.dumps(rec, sort_keys=True) + "\n").encode()
        errors = []
        for path in self._batch_state_paths():
            try:
                append_whole(path, data)
                return
            except OSError as e:
                errors.append(f"{path}: {e.strerror or e}")
        raise StorageError(
            f"cannot record batch {rec['batch_id']} ({'; '.join(errors)}); it was submitted and "
            f"will be billed: free space, then append this line to {self._batch_state_path()} "
            f"before rerunning: {data.decode().strip()}"
        )

    async def run_batch_async(
        self,
        requests: Sequence[ChatRequest],
        desc: str = "batch",
        poll_interval_s: float = 30.0,
        max_requests_per_batch: int = 50_000,
        max_batch_bytes: int = 190 * 1024**2,
        max_wait_s: Optional[float] = None,
        stop: Optional[Stop] = None,
    ) -> list[dict]:
        """The same results through the Batch API (half price, up to 24 h). Submitted batch
        ids are recorded before polling, so a killed run picks up its batches again instead
        of submitting (and paying for) the same requests twice."""
        t0 = time.monotonic()
        summary = Summary()
        unique: dict[str, ChatRequest] = {}
        for r in requests:
            unique.setdefault(r.key, r)
        results: dict[str, dict] = {}
        for k in list(unique):
            hit = self.cache.get(k)
            if hit is not None:
                results[k] = hit
                summary.add_result(hit, True)
        state = self._read_batch_state()
        in_flight = {bid: s for bid, s in state.items() if not s.get("collected")}
        covered = {k for s in in_flight.values() for k in s["keys"]}
        todo = [r for k, r in unique.items() if k not in results and k not in covered]
        oai = self._client()
        try:
            for chunk, data in _batch_files(todo, max_requests_per_batch, max_batch_bytes):
                if self.cache.failed:
                    break  # collected answers cannot be saved: submit (and pay for) no more
                f = await oai.files.create(file=("requests.jsonl", data), purpose="batch")
                b = await oai.batches.create(
                    input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h"
                )
                rec = {
                    "batch_id": b.id,
                    "input_file_id": f.id,
                    "keys": [r.key for r in chunk],
                    "submitted_unix": time.time(),
                }
                self._append_batch_state(rec)
                in_flight[b.id] = rec
                log.info("%s: submitted batch %s with %d requests", desc, b.id, len(chunk))
            bar = tqdm(total=len(unique), initial=len(results), desc=desc, unit="req", disable=not self.progress)
            pending = dict(in_flight)
            while pending:
                for bid in list(pending):
                    b = await oai.batches.retrieve(bid)
                    if b.status not in ("completed", "failed", "expired", "cancelled"):
                        continue
                    by_key = {r.key: r for r in (unique.get(k) for k in pending[bid]["keys"]) if r is not None}
                    got = await self._collect_batch(oai, b, by_key)
                    for k, rec in got.items():
                        results[k] = rec
                        summary.add_result(rec, False)
                        bar.update(1)
                    self._append_batch_state({"batch_id": bid, "collected": True, "status": b.status})
                    del pending[bid]
                bar.set_postfix(batches=len(pending), err=summary.errors, usd=f"{summary.cost_usd:.4f}", refresh=True)
                if pending:
                    if max_wait_s is not None and time.monotonic() - t0 > max_wait_s:
                        raise FeedbackError(
                            f"{len(pending)} batch(es) still running after {max_wait_s}s: {sorted(pending)}; "
                            "rerun to keep polling them (they are recorded, not resubmitted)"
                        )
                    await _sleep_unless(stop, poll_interval_s)
                    if stop is not None and stop.requested:
                        raise stop.interrupted(
                            f"{len(pending)} batch(es) are submitted and recorded in {self._batch_state_path()}; "
                            "rerun the same command to collect them (nothing is submitted twice)"
                        )
            bar.close()
            # Keys of an in-flight batch from an earlier run that this run did not ask for
            # were collected into the cache above; keys this run asked for but no batch
            # returned are errors.
            for k, r in unique.items():
                if k not in results:
                    hit = self.cache.get(k)
                    if hit is not None:
                        results[k] = hit
                        summary.add_result(hit, True)
                        continue
                    rec = self._error_record(
                        r, _Failure("batch_missing", "no result for this request in any batch"), 1, "batch"
                    )
                    self.cache.put(rec)
                    results[k] = rec
                    summary.add_result(rec, False)
        finally:
            summary.elapsed_s = time.monotonic() - t0
            self._fold(summary)
            self.cache.sync()
            await self._aclose()
        log.info("%s: %s", desc, summary.line())
        self.cache.raise_if_failed()
        return [results[r.key] for r in requests]

    async def _collect_batch(self, oai, b, by_key: Mapping[str, ChatRequest]) -> dict[str, dict]:
        out: dict[str, dict] = {}
        for file_id in (b.output_file_id, b.error_file_id):
            if not file_id:
                continue
            content = await oai.files.content(file_id)
            for n, line in enumerate(content.content.splitlines()):
                if not line.strip():
                    continue
                try:
                    item = json.loads(line)
                    key = item["custom_id"]
                except (ValueError, KeyError, TypeError) as e:
                    log.warning("batch %s file %s line %d unreadable: %s", b.id, file_id, n, e)
                    continue
                req = by_key.get(key)
                if req is None:
                    continue
                resp = item.get("response") or {}
                status = resp.get("status_code")
                if status == 200 and not item.get("error"):
                    try:
                        parsed = parse_completion(resp.get("body"))
                    except ValueError as e:
                        rec = self._error_record(req, _Failure("malformed_response", str(e), 200), 1, "batch")
                    else:
                        rec = self._ok_record(req, parsed, 1, 0.0, "batch")
                else:
                    err = item.get("error") or (resp.get("body") or {}).get("error") or {}
                    msg = err.get("message") if isinstance(err, dict) else str(err)
                    rec = self._error_record(req, _Failure(f"batch_http_{status}", str(msg), status), 1, "batch")
                self.cache.put(rec)
                out[key] = rec
        for key, req in by_key.items():
            if key not in out and self.cache.get(key) is None:
                rec = self._error_record(
                    req,
                    _Failure(f"batch_{b.status}", f"batch {b.id} ended '{b.status}' without a result for it"),
                    1,
                    "batch",
                )
                self.cache.put(rec)
                out[key] = rec
        return out

    def run_batch(self, requests: Sequence[ChatRequest], desc: str = "batch", **kw) -> list[dict]:
        with graceful() as stop:
            return asyncio.run(self.run_batch_async(requests, desc, stop=stop, **kw))

    def close(self) -> None:
        self.cache.close()

    def __enter__(self) -> "FeedbackClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


async def _sleep_unless(stop: Optional[Stop], seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end and not (stop is not None and stop.requested):
        await asyncio.sleep(min(0.1, max(0.0, end - time.monotonic())))


def _batch_files(reqs: Sequence[ChatRequest], max_requests: int, max_bytes: int):
    """(requests, JSONL bytes) chunks within the Batch API's per-file limits (50,000 lines,
    200 MB)."""
    chunk, buf = [], io.BytesIO()
    for r in reqs:
        line = (
            json.dumps(
                {"custom_id": r.key, "method": "POST", "url": "/v1/chat/completions", "body": r.body()},
                ensure_ascii=False,
            ).encode("utf-8")
            + b"\n"
        )
        if chunk and (len(chunk) >= max_requests or buf.tell() + len(line) > max_bytes):
            yield chunk, buf.getvalue()
            chunk, buf = [], io.BytesIO()
        chunk.append(r)
        buf.write(line)
    if chunk:
        yield chunk, buf.getvalue()


def _httpx():
    """The HTTP library the installed openai package is built on (httpx, or httpx2 in its
    newer releases)."""
    from openai import _base_client

    return getattr(_base_client, "httpx2", None) or _base_client.httpx


def _transport_failure(e: BaseException) -> tuple[str, BaseException]:
    """("timeout" | "connection", root cause). The aiohttp transport reports a dropped
    connection as a connect timeout, so the cause chain decides, not the openai class."""
    chain, seen = [], set()
    x: Optional[BaseException] = e
    while x is not None and id(x) not in seen:
        seen.add(id(x))
        chain.append(x)
        x = x.__cause__ or x.__context__
    root = chain[-1]
    try:
        import aiohttp

        for c in chain:
            if isinstance(c, (aiohttp.ServerTimeoutError, asyncio.TimeoutError, TimeoutError)):
                return "timeout", c
            if isinstance(c, (aiohttp.ClientConnectionError, ConnectionError)):
                return "connection", c
    except ImportError:  # pragma: no cover
        pass
    return ("timeout" if isinstance(e, openai.APITimeoutError) else "connection"), root


def _error_text(e: openai.APIStatusError) -> str:
    body = e.body
    if isinstance(body, dict):
        err = body.get("error", body)
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])
    try:
        return e.response.text[:500]
    except Exception:  # pragma: no cover
        return str(e)
