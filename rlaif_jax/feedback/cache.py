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

A failed append (a full disk, a quota, a read-only remount) loses nothing already paid
for: the answer stays in memory with every later one, the client stops sending new
requests, and at the end those answers go to a rescue file (`<cache>.unsaved.jsonl`
beside the cache, else a file under the temp directory keyed by the cache's real path)
that the next ResultCache on that path merges into the cache and then deletes. The run
ends with a StorageError naming the cache, the OS error, what was kept where, and what
to do (free space, rerun: nothing paid for is sent again).

The cache is a local working file (appends, flock, fsync, truncation of a torn line: none
of which an object store offers); a URL (gs://...) as its path is refused. Keep it on the
VM's disk, or on a mounted bucket where appends are supported, and send the stages'
outputs to gs:// instead.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import tempfile
import threading
import time
from typing import Iterator, Optional

from rlaif_jax.errors import ConfigError, StorageError, UserError
from rlaif_jax.fileio import is_url

log = logging.getLogger(__name__)


# Two processes appending to one cache could interleave partial lines, so a process holds
# an flock on "<cache>.lock" while any of its ResultCaches for that path is open (the
# kernel drops it when a process dies, so a killed run never leaves it held). Instances in
# one process share the lock: they append whole lines from one thread.
_PROCESS_LOCKS: dict[str, list] = {}
_PROCESS_LOCKS_GUARD = threading.Lock()


class CacheInUseError(RuntimeError, UserError):
    """Another live process holds the cache (RuntimeError for callers that caught that)."""


def rescue_paths(path: str) -> list[str]:
    """Where answers the cache could not hold are saved, in the order tried: beside the
    cache, then (that disk being the full one, usually) the temp directory, under a name
    keyed by the cache's real path so that the next run on that cache finds it."""
    key = hashlib.sha256(os.path.realpath(path).encode()).hexdigest()[:16]
    name = f"{os.path.basename(path)}-{key}.unsaved.jsonl"
    return [path + ".unsaved.jsonl", os.path.join(tempfile.gettempdir(), "rlaif_jax_unsaved", name)]


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
            raise CacheInUseError(
                f"FeedbackClient.cache_path = {path!r} is in use by another process (lock "
                f"{path}.lock); give each concurrent run its own cache_path"
            ) from None
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
            raise ConfigError(
                f"FeedbackClient.cache_path = {self.path!r}: the API cache is an append-only local working file (it "
                "needs appends, flock and fsync); give a local path. Stage outputs (out_dir) may be gs:// URLs."
            )
        self._locked = False
        self.fsync_interval_s = fsync_interval_s
        self._ok: dict[str, dict] = {}
        self._errors: dict[str, dict] = {}
        self._lock = threading.Lock()
        self._last_fsync = time.monotonic()
        self.torn_lines = 0
        # After a failed append: the first error, the lines (and whether each is a paid
        # answer) not in the cache file, and where a rescue put them.
        self.failure: Optional[OSError] = None
        self._unsaved: list[tuple[bytes, bool]] = []
        self._rescued: list[tuple[str, int, int]] = []
        self._rescue_errors: list[str] = []
        d = os.path.dirname(self.path)
        if d:
            os.makedirs(d, exist_ok=True)
        _acquire_process_lock(self.path)
        self._locked = True
        try:
            self._load()
            # Unbuffered: one write per line, so a failed write is reported by the call
            # that made it, and nothing is left in a buffer for close() to fail on again.
            self._f = open(self.path, "ab", buffering=0)
            self._merge_rescued()
        except BaseException:
            f = getattr(self, "_f", None)
            if f is not None:
                f.close()
            self._locked = False
            _release_process_lock(self.path)
            raise

    def _load(self) -> None:
        if not os.path.exists(self.path):
            return
        with open(self.path, "rb") as f:
            data = f.read()
        for rec in self._parse(data, self.path):
            self._remember(rec)
        if data and not data.endswith(b"\n"):
            # A torn last line would glue onto the next append; cut it off.
            with open(self.path, "r+b") as f:
                f.truncate(data.rfind(b"\n") + 1)

    def _parse(self, data: bytes, path: str) -> list[dict]:
        out = []
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
                rec["key"]
            except (ValueError, KeyError, TypeError) as e:
                # Only a torn tail is expected (kill -9 mid-write); anything else is reported.
                self.torn_lines += 1
                log.warning("%s: line %d unreadable (%s); ignored", path, lineno, e)
                continue
            out.append(rec)
        return out

    def _remember(self, rec: dict) -> None:
        if rec.get("status") == "ok":
            self._ok[rec["key"]] = rec
            self._errors.pop(rec["key"], None)
        else:
            self._errors[rec["key"]] = rec

    def _merge_rescued(self) -> None:
        """Answers an earlier run could not append (disk full) go into the cache now; the
        rescue files are deleted only once every line is in the cache and synced."""
        found = [p for p in rescue_paths(self.path) if os.path.exists(p)]
        if not found:
            return
        lines = []
        for p in found:
            with open(p, "rb") as f:
                for rec in self._parse(f.read(), p):
                    known = self._ok.get(rec["key"])
                    if known is None or (rec.get("status") == "ok" and rec != known):
                        self._remember(rec)
                        lines.append(_line(rec))
        try:
            for line in lines:
                self._append(line)
            os.fsync(self._f.fileno())
        except OSError as e:
            self._cut_torn_tail()
            raise StorageError(
                f"{self.path}: cannot merge the {len(lines)} answers saved in {', '.join(found)} by an earlier run "
                f"into the cache ({_reason(e)}); free space on that disk and rerun (those files are kept)"
            ) from e
        for p in found:
            os.remove(p)
        log.warning(
            "%s: merged %d answers an earlier run could not save (from %s)", self.path, len(lines), ", ".join(found)
        )

    def get(self, key: str) -> Optional[dict]:
        """The cached successful result for `key`, if any."""
        return self._ok.get(key)

    def last_error(self, key: str) -> Optional[dict]:
        return self._errors.get(key)

    def __contains__(self, key: str) -> bool:
        return key in self._ok

    def __len__(self) -> int:
        return len(self._ok)

    @property
    def failed(self) -> bool:
        """True once an append failed: callers stop sending requests (their answers could
        not be saved)."""
        return self.failure is not None

    def put(self, record: dict) -> None:
        """Appends a result. Never raises for a failed write: the result is kept in memory
        (see the module docstring) and `failed` turns True."""
        line = _line(record)
        with self._lock:
            self._remember(record)
            if self.failure is None:
                try:
                    self._append(line)
                    return
                except OSError as e:
                    self.failure = e
                    self._cut_torn_tail()
                    log.error(
                        "%s: cannot append (%s); keeping answers in memory and sending no new requests",
                        self.path,
                        _reason(e),
                    )
            self._unsaved.append((line, record.get("status") == "ok"))

    def _append(self, line: bytes) -> None:
        view = memoryview(line)
        while view:
            view = view[self._f.write(view) :]  # a short write is followed by the call that fails
        now = time.monotonic()
        if now - self._last_fsync >= self.fsync_interval_s:
            os.fsync(self._f.fileno())
            self._last_fsync = now

    def _cut_torn_tail(self) -> None:
        """A failed append may leave part of a line: cut back to the last whole line so that
        no later append (this process, once space is free) glues onto it."""
        try:
            size = os.fstat(self._f.fileno()).st_size
            with open(self.path, "rb") as f:
                f.seek(max(0, size - (1 << 20)))
                tail = f.read()
            nl = tail.rfind(b"\n")
            if nl < 0 and len(tail) < size:
                return  # a line longer than the tail read: leave it to the next load
            keep = size - len(tail) + nl + 1
            if keep < size:
                os.ftruncate(self._f.fileno(), keep)
        except OSError:
            pass  # the next load cuts a torn tail anyway

    def sync(self) -> None:
        """fsync now (end of a run)."""
        with self._lock:
            if not self._f.closed and self.failure is None:
                try:
                    os.fsync(self._f.fileno())
                except OSError as e:
                    self.failure = e
                    log.error("%s: fsync failed (%s)", self.path, _reason(e))
                self._last_fsync = time.monotonic()

    def rescue(self) -> None:
        """Writes the results the cache could not hold to the first rescue file that takes
        them (rescue_paths), for the next run on this cache to merge."""
        with self._lock:
            if not self._unsaved:
                return
            data = b"".join(line for line, _ in self._unsaved)
            answers = sum(ok for _, ok in self._unsaved)
            for path in rescue_paths(self.path):
                try:
                    append_whole(path, data)
                except OSError as e:
                    self._rescue_errors.append(f"{path}: {_reason(e)}")
                    continue
                self._rescued.append((path, answers, len(self._unsaved)))
                self._unsaved = []
                return

    def storage_error(self) -> Optional[StorageError]:
        """After a failed append: rescues what is unsaved, and returns the error that ends
        the run (None when nothing failed)."""
        if self.failure is None:
            return None
        self.rescue()
        e = self.failure
        what = f"{self.path}: cannot save API answers ({_reason(e)})"
        parts = []
        for path, answers, results in self._rescued:
            also = f" and {results - answers} error records" if results > answers else ""
            parts.append(f"kept {answers} paid answers{also} in {path}")
        lost = sum(ok for _, ok in self._unsaved)
        if lost:
            parts.append(
                f"could not save {lost} paid answers anywhere ({'; '.join(self._rescue_errors)}): they "
                "will be requested again"
            )
        kept = "; ".join(parts) or "no answer was waiting to be saved"
        return StorageError(
            f"{what}; stopped sending requests; {kept}; free space on that disk and rerun the same "
            "command: rescued answers go into the cache first and nothing already in it is sent again"
        )

    def raise_if_failed(self) -> None:
        err = self.storage_error()
        if err is not None:
            raise err from self.failure

    def records(self) -> Iterator[dict]:
        yield from self._ok.values()

    def close(self) -> None:
        with self._lock:
            if not self._f.closed:
                try:
                    if self.failure is None:
                        os.fsync(self._f.fileno())
                finally:
                    self._f.close()
            if self._locked:
                self._locked = False
                _release_process_lock(self.path)
        if self._unsaved:
            self.rescue()
            err = self.storage_error()
            log.error("%s", err)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):  # pragma: no cover - best effort
        try:
            self.close()
        except Exception:
            pass


def append_whole(path: str, data: bytes) -> None:
    """Appends whole lines and fsyncs, or leaves the file as it was (a partial append
    would only take the last free bytes of a full disk, and glue onto the next one)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "a+b", buffering=0) as f:
        start = f.seek(0, os.SEEK_END)
        if start:
            f.seek(start - 1)
            if f.read(1) != b"\n":
                data = b"\n" + data  # a kill mid-append left a torn line: start a fresh one
        try:
            view = memoryview(data)
            while view:
                view = view[f.write(view) :]
            os.fsync(f.fileno())
        except OSError:
            try:
                if start:
                    os.ftruncate(f.fileno(), start)
                else:
                    os.remove(path)
            except OSError:
                pass
            raise


def _line(record: dict) -> bytes:
    return (json.dumps(record, sort_keys=True, ensure_ascii=False) + "\n").encode("utf-8")


def _reason(e: OSError) -> str:
    return f"{e.strerror or e} [Errno {e.errno}]" if e.errno else str(e)


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
