"""Append-only JSONL result cache: one line per finished request, keyed by request hash.

Why JSONL and not sqlite: one writer process appends whole lines, a kill -9 can at worst
leave one torn last line (detected and ignored on load, then truncated away), the file is
greppable and diffable, and reruns read it back in one pass. Each line is written and
flushed as the result arrives, so it is in the kernel before the request counts as done:
a killed process loses nothing it was told about. fsync (which only matters for a power
loss or an OS crash) runs at most every `fsync_interval_s` and at close, because at
thousands of results a second a per-line fsync would become the bottleneck.

Lines carry `status` "ok" or "error". Only "ok" lines are treated as paid-for results;
an "error" line is kept as the record of what went wrong, and a later run tries that
request again (nothing was paid for it, and an auth or quota error may since be fixed).
Later lines win over earlier ones for the same key.

The cache is a local working file (appends, flock, fsync, truncation of a torn line: none
of which an object store offers); a URL (gs://...) as its path is refused. Keep it on the
VM's disk, or on a mounted bucket where appends are supported, and send the stages'
outputs to gs:// instead.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import threading
import time
from typing import Any, Iterator, Optional

from rlaif_jax.fileio import is_url

log = logging.getLogger(__name__)


# Two processes appending to one cache could interleave partial lines, so a process holds
# an flock on "<cache>.lock" while any of its ResultCaches for that path is open (the
# kernel drops it when a process dies, so a killed run never leaves it held). Instances in
# one process share the lock: they append whole lines from one thread.
_PROCESS_LOCKS: dict[str, list] = {}
_PROCESS_LOCKS_GUARD = threading.Lock()


def _acquire_process_lock(path: str) -> None:
    real = os.path.realpath(path)
    with _PROCESS_LOCKS_GUARD:
        held = _PROCESS_LOCKS.get(real)
        if held:
            held[1] += 1
            return
        f = open(path + ".lock", "w")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.close()
            raise RuntimeError(f"{path} is in use by another process (lock {path}.lock); "
                               "give each concurrent run its own cache_path") from None
        _PROCESS_LOCKS[real] = [f, 1]


def _release_process_lock(path: str) -> None:
    real = os.path.realpath(path)
    with _PROCESS_LOCKS_GUARD:
        held = _PROCESS_LOCKS.get(real)
        if not held:
            return
        held[1] -= 1
        if held[1] == 0:
            held[0].close()
            del _PROCESS_LOCKS[real]


class ResultCache:
    def __init__(self, path: str | os.PathLike, fsync_interval_s: float = 0.25):
        self.path = os.fspath(path)
        if is_url(self.path):
            raise ValueError(
                f"cache_path {self.path!r}: the API cache is an append-only local working file (it "
                "needs appends, flock and fsync); give a local path. Stage outputs (out_dir) may be gs:// URLs."
            )
        self._locked = False
        self.fsync_interval_s = fsync_interval_s
        self._ok: dict[str, dict] = {}
        self._errors: dict[str, dict] = {}
        self._lock = threading.Lock()
        self._last_fsync = time.monotonic()
        self.torn_lines = 0
        d = os.path.dirname(self.path)
        if d:
            os.makedirs(d, exist_ok=True)
        _acquire_process_lock(self.path)
        self._locked = True
        self._load()
        self._f = open(self.path, "ab")

    def _load(self) -> None:
        if not os.path.exists(self.path):
            return
        with open(self.path, "rb") as f:
            data = f.read()
        pos = 0
        lineno = 0
        while pos < len(data):
            nl = data.find(b"\n", pos)
            end = len(data) if nl < 0 else nl + 1
            line = data[pos:end]
            lineno += 1
            pos = end
            try:
                if nl < 0:
                    raise ValueError("no newline (torn write)")
                rec = json.loads(line)
                key = rec["key"]
            except (ValueError, KeyError, TypeError) as e:
                # Only a torn tail is expected (kill -9 mid-write); anything else is reported.
                self.torn_lines += 1
                log.warning("%s: line %d unreadable (%s); ignored", self.path, lineno, e)
                continue
            if rec.get("status") == "ok":
                self._ok[key] = rec
                self._errors.pop(key, None)
            else:
                self._errors[key] = rec
        if data and not data.endswith(b"\n"):
            # A torn last line would glue onto the next append; cut it off.
            with open(self.path, "r+b") as f:
                f.truncate(data.rfind(b"\n") + 1)

    def get(self, key: str) -> Optional[dict]:
        """The cached successful result for `key`, if any."""
        return self._ok.get(key)

    def last_error(self, key: str) -> Optional[dict]:
        return self._errors.get(key)

    def __contains__(self, key: str) -> bool:
        return key in self._ok

    def __len__(self) -> int:
        return len(self._ok)

    def put(self, record: dict) -> None:
        line = (json.dumps(record, sort_keys=True, ensure_ascii=False) + "\n").encode("utf-8")
        with self._lock:
            self._f.write(line)
            self._f.flush()
            now = time.monotonic()
            if now - self._last_fsync >= self.fsync_interval_s:
                os.fsync(self._f.fileno())
                self._last_fsync = now
            if record.get("status") == "ok":
                self._ok[record["key"]] = record
                self._errors.pop(record["key"], None)
            else:
                self._errors[record["key"]] = record

    def sync(self) -> None:
        """Flush and fsync now (end of a run)."""
        with self._lock:
            if not self._f.closed:
                self._f.flush()
                os.fsync(self._f.fileno())
                self._last_fsync = time.monotonic()

    def records(self) -> Iterator[dict]:
        yield from self._ok.values()

    def close(self) -> None:
        with self._lock:
            if not self._f.closed:
                self._f.flush()
                os.fsync(self._f.fileno())
                self._f.close()
            if self._locked:
                self._locked = False
                _release_process_lock(self.path)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):  # pragma: no cover - best effort
        try:
            self.close()
        except Exception:
            pass


def read_cache_lines(path: str | os.PathLike) -> list[dict]:
    """Every readable line of a cache file (for tests and audits)."""
    out = []
    with open(path, "rb") as f:
        for line in f:
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
    return out


def record_summary(rec: dict[str, Any]) -> str:
    return f"{rec.get('key', '?')[:12]} {rec.get('status')}"
