"""orbax checkpoints of the train state plus the data iterator position.

A checkpoint holds everything an exact resume needs: params, optimizer state, step, RNG and
the iterator state (JSON). Saves are asynchronous where orbax supports it; keep-last-N.
Paths may be local or gs://.

A save that fails for lack of space (or any other OS error) ends the run with one
StorageError naming the step, the error and the last complete checkpoint, which stays the
latest: orbax writes each step into `<step>.orbax-checkpoint-tmp*` and renames it into place
only once complete, and the failed step's temporary directory is removed here (and any left
by a killed run when the next run starts).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import sys
import threading
import time
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp

from rlaif_jax.errors import StorageError

log = logging.getLogger(__name__)

TMP_MARKER = ".orbax-checkpoint-tmp"


class _StorageFailureOnce(logging.Filter):
    """orbax logs one storage failure from each of its threads, each with a traceback (seven
    for one full disk); the Checkpointer reports it once, as a StorageError naming the OS
    error, so orbax's records of it are dropped (kept with RLAIF_TRACEBACK=1, as the
    scripts' own tracebacks are)."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return exc is None or _os_error(exc) is None or os.environ.get("RLAIF_TRACEBACK") == "1"


_FILTER = _StorageFailureOnce()
logging.getLogger("absl").addFilter(_FILTER)  # orbax logs through absl
# orbax gathers its writes on a private event loop; when one fails the others' failures are
# left in futures nobody reads, which asyncio logs ("Future exception was never retrieved").
logging.getLogger("asyncio").addFilter(_FILTER)


def _quiet_closed_loop_hook(previous):
    """sys.unraisablehook without the "Event loop is closed" errors of orbax's writer threads
    that finish after a failed save closed its private event loop: noise after the one
    StorageError, never an error of its own."""

    def hook(u):
        if (
            isinstance(u.exc_value, RuntimeError)
            and str(u.exc_value) == "Event loop is closed"
            and os.environ.get("RLAIF_TRACEBACK") != "1"
        ):
            return
        previous(u)

    hook.quiet_closed_loop = True
    return hook


# tensorstore (orbax's array writer) reports an OS error as a ValueError whose message ends
# "... No space left on device [os_error_code='28']".
_TENSORSTORE_OS_ERROR = re.compile(r"\[os_error_code='?(\d+)'?\]")


def _os_error(e: BaseException) -> Optional[OSError]:
    """The OS error behind `e` (orbax re-raises it from other threads, sometimes wrapped)."""
    todo, seen = [e], set()
    while todo:
        e = todo.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and not isinstance(e, StorageError):
            return e
        m = _TENSORSTORE_OS_ERROR.search(str(e))
        if m:
            code = int(m.group(1))
            return OSError(code, os.strerror(code))
        todo += [e.__cause__, e.__context__]
    return None


class Checkpointer:
    """The run's checkpoints; made by the run's writer only (it removes a killed run's
    temporary directories when it starts)."""

    def __init__(self, directory: str, keep: int = 3, async_save: bool = True):
        # orbax wants absolute local paths; gs:// and other URLs pass through.
        self.directory = directory if "://" in directory else os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            enable_async_checkpointing=async_save,
            create=True,
        )
        # A killed run's half-written steps (the run directory's writer lock makes this safe).
        # Not orbax's cleanup_tmp_directories: it runs in the background, and a run that stops
        # at once (a bad setting) exits under it, with a traceback.
        self._remove_partial(None)
        self._mngr = ocp.CheckpointManager(self.directory, options=options)
        if not getattr(sys.unraisablehook, "quiet_closed_loop", False):
            sys.unraisablehook = _quiet_closed_loop_hook(sys.unraisablehook)
        self._pending: Optional[int] = None  # the step of a save that may still be running
        self._failed = False

    def latest_step(self) -> Optional[int]:
        return self._mngr.latest_step()

    def all_steps(self) -> list:
        return list(self._mngr.all_steps())

    def save(self, step: int, state: Any, data_state: Optional[dict], meta: Optional[dict] = None) -> None:
        """Starts saving `step` (in the background when async); a failure of the previous
        save is raised here, as a StorageError naming that step."""
        self.wait()
        args = {
            "state": ocp.args.StandardSave(state),
            "data": ocp.args.JsonSave(data_state or {}),
            "meta": ocp.args.JsonSave(meta or {}),
        }
        self._pending = step
        try:
            self._mngr.save(step, args=ocp.args.Composite(**args), force=True)
        except Exception as e:
            self._raise_storage_error(e)
            raise

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict, dict]:
        """abstract_state: a tree of jax.ShapeDtypeStruct with shardings (where to put it)."""
        out = self._mngr.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state),
                data=ocp.args.JsonRestore(),
                meta=ocp.args.JsonRestore(),
            ),
        )
        return out["state"], dict(out["data"] or {}), dict(out["meta"] or {})

    def restore_data(self, step: int) -> dict:
        """The iterator position alone: the data can be set up before the model exists."""
        out = self._mngr.restore(step, args=ocp.args.Composite(data=ocp.args.JsonRestore()))
        return dict(out["data"] or {})

    def wait(self) -> None:
        """Blocks until the last save is complete; StorageError if it failed."""
        if self._failed:
            return
        try:
            self._mngr.wait_until_finished()
        except Exception as e:
            self._raise_storage_error(e)
            raise
        self._pending = None

    def close(self) -> None:
        try:
            self.wait()
        finally:
            try:
                self._mngr.close()
            except Exception as e:
                if not self._failed:  # after a failure, close re-raises it: reported already
                    self._raise_storage_error(e)
                    raise
            if self._failed and self._pending is not None:
                # Writer threads still running at the failure can recreate the directory.
                self._remove_partial(self._pending)

    def _raise_storage_error(self, e: BaseException) -> None:
        """Raises the StorageError for a failed save of self._pending, after removing that
        step's partial files; returns when `e` is not a storage failure."""
        os_error = _os_error(e)
        if os_error is None:
            return
        self._failed = True
        step = self._pending
        _join_orbax_threads(timeout=60.0)
        removed = step is not None and self._remove_partial(step)
        try:
            self._mngr.reload()  # the steps on disk: the failed one is not among them
            intact = self._mngr.latest_step()
        except Exception:  # pragma: no cover - the directory is unreadable as well
            intact = None
        kept = (
            f"the last complete checkpoint, step {intact}, is intact"
            if intact is not None
            else "no checkpoint is complete yet"
        )
        partial = "; its partial files are removed" if removed else ""
        resume = f"resume from step {intact}" if intact is not None else "start over"
        raise StorageError(
            f"{self.directory}: could not write the checkpoint of step {step} "
            f"({os_error.strerror or os_error}){partial}; {kept}. Free space (or fix the permissions) there and "
            f"rerun the same command to {resume}"
        ) from e

    def _remove_partial(self, step: Optional[int]) -> bool:
        """Removes the temporary directory of `step` (of every step: None)."""
        if "://" in self.directory or jax.process_index() != 0 or not os.path.isdir(self.directory):
            return False  # an object store has no temporary directory: the step is never committed
        removed = False
        for name in os.listdir(self.directory):
            if TMP_MARKER in name and (step is None or name.startswith(f"{step}{TMP_MARKER}")):
                shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)
                removed = True
        return removed


def _join_orbax_threads(timeout: float) -> None:
    """Waits (bounded) for orbax's background threads of a failed save: they keep writing into
    the step's temporary directory for a moment, and if the process exits first they fail
    again at shutdown, each with a traceback."""
    deadline = time.monotonic() + timeout
    for t in threading.enumerate():
        if t is not threading.current_thread() and type(t).__module__.startswith("orbax"):
            try:
                t.join(max(0.0, deadline - time.monotonic()))
            except Exception:  # orbax's threads re-raise their failure on join: the one reported
                pass


def abstract_like(tree: Any) -> Any:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)
