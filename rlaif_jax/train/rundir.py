"""A training run directory that may live on an object store (gs://, any fsspec URL).

A local run_dir is written in place, exactly as always. A URL run_dir is staged: every
file the run writes (metrics.jsonl, TensorBoard events, config.gin, operative_config.gin,
summary.json, a non-finite batch dump) goes to a local staging directory, which is mirrored
to the URL at every checkpoint save and when the run ends (normally or by an error).
Object stores cannot append, and metrics.jsonl and the event files grow for the whole run,
so writing them through the store directly would mean one upload per logged step; a
mirror at checkpoint saves costs one upload of each changed file per checkpoint, and what
survives a preemption is exactly the metrics up to the checkpoint the run resumes from.

Each upload is one whole object (atomic on GCS); the mirror never deletes remote files. At
start the remote metrics.jsonl (if any) is downloaded into staging, so a resumed run appends
to it instead of overwriting it. TensorBoard event files are never downloaded: each writer
starts a new events file and the old ones stay where they are.

The HF export is written to staging, uploaded file by file, and then marked complete by
`hf/EXPORT_COMPLETE.json` (file names and sizes), written last; the marker is removed
before a re-export starts. A remote hf/ without the marker is an interrupted export. (A
local run_dir's export is written to hf.partial/ and renamed to hf/ when whole, so a local
hf/ is always complete.)

Staging is `tempfile.mkdtemp()` (under $RLAIF_STAGING_DIR when set) and is deleted once
its last upload succeeded; if that upload fails the directory is kept and its path logged.
Only process 0 writes and uploads.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import time
from typing import Callable, Iterable, Optional

import jax

from rlaif_jax import fileio
from rlaif_jax.errors import StorageError
from rlaif_jax.models.remote import HF_EXPORT_MARKER, STAGING_ENV, rjoin

log = logging.getLogger(__name__)

HF_DIR = "hf"
PARTIAL_SUFFIX = ".partial"


class RunDir:
    """`local_path(...)` is where to write; `sync()` mirrors it to the URL (no-op locally)."""

    def __init__(self, path: str, pull: Iterable[str] = ("metrics.jsonl",)):
        self.path = os.fspath(path)
        self.remote = fileio.is_url(self.path)
        self.writer = jax.process_index() == 0
        self._uploaded: dict[str, tuple] = {}
        self._closed = False
        if not self.remote:
            os.makedirs(self.path, exist_ok=True)
            self.local = self.path
            return
        base = os.environ.get(STAGING_ENV) or None
        if base:
            os.makedirs(base, exist_ok=True)
        self.local = tempfile.mkdtemp(prefix="rlaif_run_", dir=base)
        if not self.writer:
            return
        fs, root = fileio.url_fs(self.path)
        for name in pull:
            remote = rjoin(root, name)
            if fs.exists(remote):
                dst = os.path.join(self.local, name)
                os.makedirs(os.path.dirname(dst), exist_ok=True)
                fs.get_file(remote, dst)
                self._uploaded[name] = _stat_key(dst)
                log.info("resuming %s: downloaded %s", self.path, name)
        log.info("run_dir %s is staged in %s and mirrored at checkpoints and at the end", self.path, self.local)

    def local_path(self, *parts: str) -> str:
        return os.path.join(self.local, *parts)

    def write_text(self, name: str, text: str) -> None:
        """A small file of the run (config.gin, summary.json ...), written by process 0 and
        staged like the logs."""
        if not self.writer:
            return
        path = self.local_path(name)
        tmp = f"{path}.tmp-{os.getpid()}"
        try:  # whole or not at all: a full disk must not leave half of the previous file
            with open(tmp, "w") as f:
                f.write(text)
            os.replace(tmp, path)
        except OSError as e:
            with contextlib.suppress(OSError):
                os.remove(tmp)
            raise StorageError(
                f"{path}: could not write it ({e.strerror or e}); the file as it was and the "
                "checkpoints are kept. Free space there and rerun the same command"
            ) from e

    def url(self, *parts: str) -> str:
        """The final location of a file (for messages): the URL, or the local path."""
        return fileio.join(self.path, *parts)

    def sync(self, writer=None) -> None:
        """Upload every staged file that changed since its last upload (not hf/: export_hf),
        after flushing `writer` (a MetricsWriter writing into the staging directory)."""
        if not (self.remote and self.writer):
            return
        if writer is not None:
            writer.flush()
        t0 = time.perf_counter()
        changed = {
            rel: key for rel, key in _walk(self.local, skip_top=(HF_DIR,)).items() if self._uploaded.get(rel) != key
        }
        if not changed:
            return
        _put(self.local, self.path, list(changed))
        self._uploaded.update(changed)
        log.info("mirrored %d file(s) to %s in %.1fs", len(changed), self.path, time.perf_counter() - t0)

    def export_hf(self, save: Callable[[str], None], info: Optional[dict] = None) -> str:
        """Run `save(directory)` (save_hf; every process calls it) and return where the
        export lives. Local: written into hf.partial/ and renamed to hf/ when complete, so
        hf/ is always a whole export (the previous one until the new one is). Remote:
        staged, uploaded, then the completion marker written last. A failed write is a
        StorageError; the partial copy is removed."""
        if not self.remote:
            out = os.path.join(self.path, HF_DIR)
            partial, old = out + PARTIAL_SUFFIX, out + ".old"
            if self.writer:  # a killed export's leftovers (the writer lock keeps others out)
                shutil.rmtree(partial, ignore_errors=True)
                if os.path.isdir(old) and not os.path.isdir(out):
                    os.replace(old, out)  # killed between the two renames below
                shutil.rmtree(old, ignore_errors=True)
            with self._export_errors(out, partial, info):
                save(partial)
                if self.writer:
                    if os.path.isdir(out):
                        os.replace(out, old)
                    os.replace(partial, out)
                    shutil.rmtree(old, ignore_errors=True)
            return out
        url = self.url(HF_DIR)
        local = self.local_path(HF_DIR)
        if self.writer:
            fileio.remove(fileio.join(url, HF_EXPORT_MARKER), missing_ok=True)
            shutil.rmtree(local, ignore_errors=True)
        with self._export_errors(url, local, info):
            save(local)
        if not self.writer:
            return url
        files = {rel: key[0] for rel, key in _walk(local).items()}
        _put(local, url, list(files))
        fileio.write_json(fileio.join(url, HF_EXPORT_MARKER), {"files": files, "time": time.time(), **(info or {})})
        shutil.rmtree(local, ignore_errors=True)  # the weights can be large; staging keeps only logs
        log.info("exported %d file(s) to %s", len(files), url)
        return url

    @contextlib.contextmanager
    def _export_errors(self, out: str, partial: str, info: Optional[dict]):
        try:
            yield
        except OSError as e:
            if isinstance(e, StorageError):
                raise
            shutil.rmtree(partial, ignore_errors=True)
            at = ", ".join(f"{k} {v}" for k, v in (info or {}).items())
            raise StorageError(
                f"{out}: could not write the HF export ({e.strerror or e}); the partial copy was removed, and the "
                f"final checkpoint{f' ({at})' if at else ''} is complete. Free space there and rerun the same "
                "command: it exports again without training"
            ) from e

    def close(self) -> None:
        """Final mirror, then delete staging (kept, and named in the log, if the upload fails)."""
        if not self.remote or self._closed:
            return
        self._closed = True
        try:
            self.sync()
        except BaseException:
            log.error("could not mirror %s to %s; the staged files are kept in %s", self.local, self.path, self.local)
            raise
        shutil.rmtree(self.local, ignore_errors=True)

    def __enter__(self) -> "RunDir":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _walk(local: str, skip_top: tuple = ()) -> dict[str, tuple]:
    """{relative "/"-path: (size, mtime_ns)} of every file under `local`."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(local):
        if dirpath == local:
            dirnames[:] = [d for d in dirnames if d not in skip_top]
        for name in sorted(filenames):
            lp = os.path.join(dirpath, name)
            out[os.path.relpath(lp, local).replace(os.sep, "/")] = _stat_key(lp)
    return out


def _put(local: str, url: str, rels: list[str]) -> None:
    """Upload local/rel to url/rel for each rel: one whole object per file, in one call
    (concurrent on async filesystems such as gcsfs)."""
    fs, root = fileio.url_fs(url)
    for parent in sorted({r.rsplit("/", 1)[0] for r in rels if "/" in r} | {""}):
        fileio.makedirs(fileio.join(url, parent) if parent else url)  # no-op on object stores
    fs.put([os.path.join(local, *r.split("/")) for r in rels], [rjoin(root, r) for r in rels])


def _stat_key(path: str) -> tuple:
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns
