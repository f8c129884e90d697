"""SIGINT / SIGTERM while work that costs money or compute is under way: one handler for the
API client and the trainers.

Inside `graceful()`, the first signal only raises a flag (`Stop.requested`): the client stops
taking new requests, saves what has arrived and waits briefly for the answers in flight; a
trainer checkpoints its current step when the last checkpoint is old. Then the work raises
`Interrupted`, whose message says what was kept, and rlaif_jax.cli.run prints it as one
`error:` line and exits 128 + the signal (130 for SIGINT, 143 for SIGTERM, what a TPU VM's
preemption sends). A second signal stops at once (KeyboardInterrupt: what was saved is
kept, nothing more is waited for), for work that takes long to notice the flag (a model
loading or compiling). Outside `graceful()` the signals keep their default behaviour.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator, Optional

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(Exception):
    """Work stopped by a signal after keeping what it could; `kept` says what (one line)."""

    def __init__(self, signum: int, kept: str):
        self.signum, self.kept = signum, kept
        super().__init__(f"stopped by {signal.Signals(signum).name}: {kept}")

    @property
    def exit_status(self) -> int:
        return 128 + self.signum


class Stop:
    """The flag a signal raises; polled by the work it interrupts."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self.signum: Optional[int] = None

    @property
    def requested(self) -> bool:
        return self._event.is_set()

    def set(self, signum: int) -> None:
        self.signum = self.signum or signum
        self._event.set()

    def interrupted(self, kept: str) -> Interrupted:
        return Interrupted(self.signum or signal.SIGINT, kept)


_active: Optional[Stop] = None


@contextlib.contextmanager
def graceful() -> Iterator[Stop]:
    """Turns SIGINT / SIGTERM into a Stop flag for the block. Nested blocks share the outer
    flag (a trainer's sampling client inside a trainer's loop). Off the main thread signals
    cannot be caught; the flag then never rises."""
    global _active
    if _active is not None:
        yield _active
        return
    stop = Stop()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return
    previous = {s: signal.getsignal(s) for s in SIGNALS}

    def handle(signum, frame):
        if stop.requested:
            raise KeyboardInterrupt
        stop.set(signum)

    for s in SIGNALS:
        signal.signal(s, handle)
    _active = stop
    try:
        yield stop
    finally:
        _active = None
        for s, h in previous.items():
            signal.signal(s, h)
