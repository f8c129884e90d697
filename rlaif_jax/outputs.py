"""Guards on output directories: one writer at a time, and no silent shrinking.

`writer_lock(directory, binding)` is held by a stage or trainer for its whole run, so a
second process pointed at the same output (and so about to pay for the same answers, or
to interleave checkpoints) stops at start-up with one line naming the holder. The lock is
an flock on `<directory>/.writer.lock`: the kernel drops it when the holder dies, so a
killed run never leaves it held. An object-store directory (gs://...) cannot be flocked;
its lock is a local file keyed by the URL, which guards the processes of one machine only.

`check_replace(directory, new_count, binding, overwrite)` refuses to replace a complete
record set (one with a manifest) by one with fewer records unless the stage's `overwrite`
binding is set: an empty or truncated input must never wipe good data. A rerun that
produces the same or more records (a resume, a larger source) passes.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import socket
import tempfile
import time
from typing import Iterator, Optional

from rlaif_jax import fileio
from rlaif_jax.errors import UserError

LOCK_NAME = ".writer.lock"


class OutputInUseError(UserError):
    """Another live process holds the output directory."""


class OutputWouldShrinkError(UserError):
    """A complete record set would be replaced by fewer records."""


def _lock_path(directory: str) -> str:
    if not fileio.is_url(directory):
        os.makedirs(directory, exist_ok=True)
        return os.path.join(directory, LOCK_NAME)
    key = hashlib.sha256(directory.rstrip("/").encode()).hexdigest()[:16]
    root = os.path.join(tempfile.gettempdir(), "rlaif_jax_locks")
    os.makedirs(root, exist_ok=True)
    return os.path.join(root, key + ".lock")


@contextlib.contextmanager
def writer_lock(directory: str, binding: str) -> Iterator[None]:
    """Holds the directory's writer lock for the block; OutputInUseError when another
    process holds it (its pid, host and start time are in the message)."""
    directory = os.fspath(directory)
    path = _lock_path(directory)
    f = open(path, "a+")
    try:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            raise OutputInUseError(
                f"{directory} is being written by {holder}; wait for it to finish or give this run another {binding}"
            ) from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        f.flush()
        yield
    finally:
        f.close()  # releases the flock


def complete_count(directory: str) -> Optional[int]:
    """num_records of the complete record set in `directory`, or None (none, or unfinished)."""
    path = fileio.join(os.fspath(directory), "manifest.json")
    if not fileio.exists(path):
        return None
    try:
        return int(fileio.read_json(path)["num_records"])
    except (ValueError, KeyError, TypeError):
        return None  # an unreadable manifest is not a complete set worth protecting


def check_replace(directory: str, new_count: int, binding: Optional[str], overwrite: bool = False) -> None:
    """Refuse to replace a complete record set by a smaller one unless `overwrite`."""
    if overwrite:
        return
    old = complete_count(directory)
    if old is not None and new_count < old:
        fix = f"set {binding}=True to replace it" if binding else "pass overwrite=True to replace it"
        raise OutputWouldShrinkError(
            f"{directory} holds a complete set of {old} records and this run would replace it with "
            f"{new_count}; check the input, {fix}, or write to another directory"
        )
