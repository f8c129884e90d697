"""Backends and fault injection for tests, benchmarks and the synthetic world.

Faults are chosen per request, either by a marker in the last user message or at random
with a seeded rate, and counted per request body so that "fail twice then succeed" is
exact:

  [[fault:429x2]]   429 with Retry-After for the first 2 sends of this body
  [[fault:500x1]]   500 for the first send
  [[fault:slowx1]]  sleep past the client's timeout on the first send
  [[fault:badjsonx1]] 200 with a truncated JSON body on the first send
  [[fault:resetx1]] TCP reset (RST) without a response on the first send
  [[fault:400]]     400 bad request, every time (cannot succeed)
  [[fault:401]]     401 whose message echoes the caller's key (a careless gateway)

The server log (`FaultInjector.log`) records every request's body hash and outcome, so a
test can check that nothing was paid for twice.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import hashlib
import json
import math
import random
import re
import socket
import struct
import threading
from typing import Optional, Sequence

from aiohttp import web

from rlaif_jax.feedback.server.app import BackendError, Choice, Completion, error_json

_MARK = re.compile(r"\[\[fault:(\w+?)(?:x(\d+))?\]\]")


def _words(text: str) -> int:
    return max(1, len(text.split()))


def last_user(request: dict) -> str:
    for m in reversed(request["messages"]):
        if m["role"] == "user":
            return m["content"]
    return ""


class EchoTeacher:
    """A deterministic 'teacher': the answer names the prompt. Prompts containing
    [[long]] finish with "length"; [[n]] gives numbered variants for n > 1."""

    def __init__(self, models: Sequence[str] = ("teacher",), latency_s: float = 0.0):
        self.models, self.latency_s = list(models), latency_s

    def model_ids(self):
        return self.models

    async def complete(self, request: dict) -> Completion:
        if self.latency_s:
            await asyncio.sleep(self.latency_s)
        prompt = last_user(request)
        n = request.get("n", 1)
        finish = "length" if "[[long]]" in prompt else "stop"
        choices = [Choice(f"Answer {i} to: {prompt}" if n > 1 else f"Answer to: {prompt}", finish) for i in range(n)]
        return Completion(choices, _words(json.dumps(request["messages"])), sum(_words(c.content) for c in choices))


_PAIR = re.compile(r"## Output \(a\)\n(.*?)\n\n## Output \(b\)\n(.*?)\n\n## Which is better\?", re.S)
_RATED = re.compile(r"## Response\n(.*?)\n\n## Rating", re.S)


class RuleJudge:
    """A critic with a known preference: the output containing `good_marker` wins; if both
    or neither do, the longer one. Answers "Output (a)"/"Output (b)" (or "Rating: N"),
    with OpenAI-shaped logprobs when asked. A pair containing [[garbage]] gets an
    unparseable answer; `position_bias` (0..1) is the chance it just says "Output (a)"."""

    def __init__(
        self,
        models: Sequence[str] = ("judge",),
        good_marker: str = "GOOD",
        confidence: float = 0.9,
        position_bias: float = 0.0,
        seed: int = 0,
        latency_s: float = 0.0,
    ):
        self.models, self.good, self.conf = list(models), good_marker, confidence
        self.position_bias, self.latency_s = position_bias, latency_s
        self._rng = random.Random(seed)

    def model_ids(self):
        return self.models

    def _score(self, text: str) -> float:
        return (1000.0 if self.good in text else 0.0) + len(text)

    async def complete(self, request: dict) -> Completion:
        if self.latency_s:
            await asyncio.sleep(self.latency_s)
        prompt = last_user(request)
        want_lp = bool(request.get("logprobs"))
        m = _PAIR.search(prompt)
        if m:
            a, b = m.group(1), m.group(2)
            if "[[garbage]]" in a + b:
                text, lp = "I cannot decide; both have merit.", None
            else:
                pick_a = self._score(a) >= self._score(b)
                if self.position_bias and self._rng.random() < self.position_bias:
                    pick_a = True
                label = "a" if pick_a else "b"
                text = f"Output ({label})"
                lp = _label_logprobs(label, self.conf) if want_lp else None
        else:
            r = _RATED.search(prompt)
            if r is None:
                raise BackendError(400, "RuleJudge: prompt is neither a pairwise nor a rating template")
            body = r.group(1)
            if "[[garbage]]" in body:
                text, lp = "This response is fine I guess.", None
            else:
                rating = 5 if self.good in body else 2
                text = f"Rating: {rating}"
                lp = _rating_logprobs(rating, self.conf) if want_lp else None
        return Completion(
            [Choice(text, "stop", {"content": lp} if lp else None)],
            _words(json.dumps(request["messages"])),
            _words(text),
        )


def _label_logprobs(label: str, conf: float) -> list:

    other = "b" if label == "a" else "a"
    top = [{"token": label, "logprob": math.log(conf)}, {"token": other, "logprob": math.log(1 - conf)}]
    return [
        {"token": "Output", "logprob": 0.0, "top_logprobs": [{"token": "Output", "logprob": 0.0}]},
        {"token": " (", "logprob": 0.0, "top_logprobs": [{"token": " (", "logprob": 0.0}]},
        {"token": label, "logprob": math.log(conf), "top_logprobs": top},
        {"token": ")", "logprob": 0.0, "top_logprobs": [{"token": ")", "logprob": 0.0}]},
    ]


def _rating_logprobs(rating: int, conf: float) -> list:

    rest = (1 - conf) / 4
    top = [{"token": str(r), "logprob": math.log(conf if r == rating else rest)} for r in range(1, 6)]
    return [
        {"token": "Rating", "logprob": 0.0, "top_logprobs": []},
        {"token": ":", "logprob": 0.0, "top_logprobs": []},
        {"token": " " + str(rating), "logprob": math.log(conf), "top_logprobs": top},
    ]


class FixedLatency:
    """Answers "ok" after a fixed delay: the benchmark's server."""

    def __init__(self, latency_s: float, models: Sequence[str] = ("bench",)):
        self.latency_s, self.models = latency_s, list(models)

    def model_ids(self):
        return self.models

    async def complete(self, request: dict) -> Completion:
        await asyncio.sleep(self.latency_s)
        return Completion([Choice("ok")], 10, 1)


@dataclasses.dataclass
class FaultRates:
    """Random faults (each a probability per send), drawn from a seeded generator."""

    rate_429: float = 0.0
    rate_500: float = 0.0
    rate_slow: float = 0.0
    rate_badjson: float = 0.0
    rate_reset: float = 0.0


class FaultInjector:
    """aiohttp middleware for /v1/chat/completions that injects the faults above."""

    def __init__(
        self, rates: Optional[FaultRates] = None, seed: int = 0, retry_after_s: float = 0.05, slow_s: float = 1.0
    ):
        self.rates = rates or FaultRates()
        self.retry_after_s, self.slow_s = retry_after_s, slow_s
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self.sends: collections.Counter = collections.Counter()
        self.log: list[dict] = []

    def paid(self) -> collections.Counter:
        """Body hash -> number of 200 responses with a well-formed completion."""
        return collections.Counter(e["body"] for e in self.log if e["outcome"] == "ok")

    def _choose(self, body_hash: str, text: str, n: int) -> Optional[str]:
        for m in _MARK.finditer(text):
            kind, times = m.group(1), m.group(2)
            if kind in ("400", "401") or times is None or n <= int(times):
                return kind
        r = self.rates
        u = self._rng.random()
        for kind, p in (
            ("429", r.rate_429),
            ("500", r.rate_500),
            ("slow", r.rate_slow),
            ("badjson", r.rate_badjson),
            ("reset", r.rate_reset),
        ):
            if u < p:
                return kind
            u -= p
        return None

    @web.middleware
    async def middleware(self, request: web.Request, handler):
        if request.path != "/v1/chat/completions":
            return await handler(request)
        raw = await request.read()
        try:
            body = json.loads(raw)
            text = last_user(body)
        except (ValueError, KeyError, TypeError):
            return await handler(request)
        h = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]
        with self._lock:
            self.sends[h] += 1
            fault = self._choose(h, text, self.sends[h])
        entry = {"body": h, "fault": fault, "outcome": None}
        self.log.append(entry)
        if fault == "429":
            entry["outcome"] = "429"
            return error_json(
                429, "rate limited, slow down", "rate_limit_error", headers={"Retry-After": f"{self.retry_after_s:g}"}
            )
        if fault == "500":
            entry["outcome"] = "500"
            return error_json(500, "internal error", "server_error")
        if fault == "400":
            entry["outcome"] = "400"
            return error_json(400, "this request can never succeed", "invalid_request_error")
        if fault == "401":
            entry["outcome"] = "401"
            got = request.headers.get("Authorization", "")
            return error_json(401, f"Incorrect API key provided: {got}", "authentication_error")
        if fault == "reset":
            entry["outcome"] = "reset"
            sock = request.transport.get_extra_info("socket") if request.transport else None
            if sock is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            request.transport.abort()
            raise asyncio.CancelledError()
        if fault == "slow":
            entry["outcome"] = "slow"
            await asyncio.sleep(self.slow_s)
        resp = await handler(request)
        if fault == "badjson":
            entry["outcome"] = "badjson"
            return web.Response(body=resp.body[: max(1, len(resp.body) // 2)], content_type="application/json")
        if fault != "slow":
            entry["outcome"] = "ok" if resp.status == 200 else str(resp.status)
        return resp
