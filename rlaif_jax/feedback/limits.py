"""Requests-per-minute and tokens-per-minute token buckets, plus a shared pause that a
429's Retry-After sets so every worker backs off, not just the one that was refused."""

from __future__ import annotations

import asyncio
import time
from typing import Optional


class TokenBucket:
    """Refills at `per_minute / 60` a second up to `capacity` (default: 1/6 of a minute's
    worth, so a fresh run does not fire a whole minute's budget in its first second).
    A request larger than the capacity waits for a full bucket and then drives the level
    negative, so it still goes through and later ones pay the debt."""

    def __init__(self, per_minute: float, capacity: Optional[float] = None, clock=time.monotonic):
        if per_minute <= 0:
            raise ValueError(f"rate must be > 0 per minute, got {per_minute}")
        self.rate = per_minute / 60.0
        self.capacity = float(capacity if capacity is not None else max(1.0, per_minute / 6.0))
        self.level = self.capacity
        self._clock = clock
        self._t = clock()

    def _refill(self) -> None:
        now = self._clock()
        self.level = min(self.capacity, self.level + (now - self._t) * self.rate)
        self._t = now

    def wait_time(self, amount: float) -> float:
        self._refill()
        need = min(amount, self.capacity)
        return 0.0 if self.level >= need else (need - self.level) / self.rate

    def take(self, amount: float) -> None:
        self._refill()
        self.level -= amount

    def give_back(self, amount: float) -> None:
        self._refill()
        self.level = min(self.capacity, self.level + amount)


class RateLimiter:
    def __init__(self, rpm: Optional[float] = None, tpm: Optional[float] = None):
        self.requests = TokenBucket(rpm) if rpm else None
        self.tokens = TokenBucket(tpm) if tpm else None
        self._lock = asyncio.Lock()
        self._pause_until = 0.0

    def pause(self, seconds: float) -> None:
        self._pause_until = max(self._pause_until, time.monotonic() + seconds)

    async def acquire(self, tokens: int) -> None:
        # One waiter at a time keeps the order FIFO and the buckets consistent.
        async with self._lock:
            while True:
                wait = self._pause_until - time.monotonic()
                if self.requests:
                    wait = max(wait, self.requests.wait_time(1))
                if self.tokens:
                    wait = max(wait, self.tokens.wait_time(tokens))
                if wait <= 0:
                    break
                await asyncio.sleep(wait)
            if self.requests:
                self.requests.take(1)
            if self.tokens:
                self.tokens.take(tokens)

    def settle(self, reserved: int, used: Optional[int]) -> None:
        """Replace the reservation with what the response says it used."""
        if self.tokens and used is not None:
            diff = reserved - used
            if diff > 0:
                self.tokens.give_back(diff)
            else:
                self.tokens.take(-diff)
