"""Metric sinks (JSONL, TensorBoard event files and, optionally, Weights & Biases) and MFU
accounting."""

from __future__ import annotations

import contextlib
import dataclasses
import html
import json
import logging
import os
import time
import uuid
from typing import Any, Optional

import gin
import jax
import numpy as np

from rlaif_jax import fileio
from rlaif_jax.errors import StorageError
from rlaif_jax.train.rundir import RunDir

log = logging.getLogger(__name__)

# Dense bf16 peak TFLOP/s per device (vendor figures), for MFU.
PEAK_TFLOPS = {
    "TPU v4": 275.0,
    "TPU v5 lite": 197.0,
    "TPU v5e": 197.0,
    "TPU v5p": 459.0,
    "TPU v6": 918.0,
    "NVIDIA H100": 989.0,
    "NVIDIA H200": 989.0,
    "NVIDIA A100": 312.0,
    "NVIDIA L4": 121.0,
}


def peak_tflops(device=None, override: Optional[float] = None) -> Optional[float]:
    """Per-device peak, or None where unknown (CPUs): MFU is then not reported."""
    if override:
        return override
    return peak_tflops_of(getattr(device or jax.devices()[0], "device_kind", ""))


def peak_tflops_of(kind: str) -> Optional[float]:
    """The peak of a device kind as JAX or torch.cuda.get_device_name spell it, or None."""
    for name, value in PEAK_TFLOPS.items():
        if kind.startswith(name):
            return value
    return None


def mfu(flops: float, seconds: float, n_devices: int, peak: Optional[float]) -> Optional[float]:
    if not peak or seconds <= 0:
        return None
    return flops / seconds / (peak * 1e12 * n_devices)


def _scalar(v: Any) -> Any:
    if isinstance(v, (np.ndarray, jax.Array)):
        v = np.asarray(v)
        return v.item() if v.size == 1 else v.tolist()
    return v


@gin.configurable
@dataclasses.dataclass(frozen=True)
class WandbLogging:
    """Weights & Biases beside TensorBoard and the JSONL (off by default; needs the `wandb`
    extra). Bind `WandbLogging.enabled = True` in gin. mode None leaves it to wandb
    (WANDB_MODE, then online); "offline" writes run_dir/wandb/ without any network, for
    `wandb sync` later. The W&B run id is kept in run_dir/wandb_run_id.txt, so a resumed
    run continues the same W&B run."""

    enabled: bool = False
    project: str = "rlaif_jax"
    entity: Optional[str] = None
    name: Optional[str] = None  # None: the run directory's name
    group: Optional[str] = None
    tags: tuple = ()
    mode: Optional[str] = None  # "online" | "offline" | "disabled" | None

    def start(self, run_dir: str):
        try:
            import wandb
        except ImportError:
            raise ImportError(
                'WandbLogging.enabled = True needs wandb: pip install -e ".[wandb]" (or unbind WandbLogging.enabled)'
            ) from None
        id_file = os.path.join(run_dir, "wandb_run_id.txt")
        if os.path.exists(id_file):
            with open(id_file) as f:
                run_id = f.read().strip()
        else:
            run_id = uuid.uuid4().hex[:12]  # W&B run ids: lowercase letters and digits
            with open(id_file, "w") as f:
                f.write(run_id + "\n")
        return wandb.init(
            project=self.project,
            entity=self.entity,
            group=self.group,
            tags=list(self.tags) or None,
            name=self.name or os.path.basename(os.path.normpath(run_dir)),
            mode=self.mode,
            dir=run_dir,
            id=run_id,
            resume="allow",
            reinit="create_new",
        )


class MetricsWriter:
    """Appends one JSON object per logged step to metrics.jsonl and mirrors scalars to
    TensorBoard (tensorboardX) when installed, and to Weights & Biases when WandbLogging is
    enabled, under the same names everywhere. Only process 0 writes.

    `resume_step`: the step a (re)started run continues from. Rows a killed run logged after
    its last checkpoint are logged again by the resumed run, so rows with a larger step are
    dropped first (metrics.jsonl rewritten atomically) and TensorBoard is told to purge its
    events from the next step on: every step appears once, as in an uninterrupted run.

    A failed write (a full disk) is a StorageError naming the file.

    A URL run_dir (gs://...) is staged locally and uploaded by `sync()` and `close()`
    (object stores cannot append; see rlaif_jax.train.rundir). The trainers stage the whole
    run directory themselves and pass the local staging path here."""

    def __init__(
        self,
        run_dir: str,
        filename: str = "metrics.jsonl",
        wandb: Optional[WandbLogging] = None,
        resume_step: Optional[int] = None,
    ):
        self.enabled = jax.process_index() == 0
        self._tb = None
        self._wandb = None
        self._mirror = None
        self._failed = False
        if not self.enabled:
            return
        if fileio.is_url(run_dir):
            self._mirror = RunDir(run_dir, pull=(filename,))
            run_dir = self._mirror.local
        os.makedirs(run_dir, exist_ok=True)
        self.path = os.path.join(run_dir, filename)
        tb_dir = os.path.join(run_dir, "tb")
        purge_step = None
        if resume_step is not None:
            truncate_after(self.path, resume_step)
            # A URL run_dir's earlier event files are not downloaded: purge whenever resuming.
            if resume_step > 0 or (os.path.isdir(tb_dir) and os.listdir(tb_dir)):
                purge_step = resume_step + 1
        self._f = open(self.path, "a")
        try:
            self._tb = _EventFile(tb_dir, purge_step)
        except ImportError:  # pragma: no cover - tensorboardX is a dependency
            log.warning("tensorboardX not installed: metrics go to %s only", filename)
        wandb = wandb if wandb is not None else WandbLogging()  # gin's bindings
        if wandb.enabled:
            self._wandb = wandb.start(run_dir)

    def write(self, step: int, metrics: dict, prefix: str = "") -> None:
        if not self.enabled:
            return
        row = {"step": int(step), "time": time.time()}
        for k, v in metrics.items():
            row[prefix + k] = _scalar(v)
        with self._reporting(f"the metrics of step {step}"):
            self._f.write(json.dumps(row) + "\n")
            self._f.flush()
            if self._tb is not None:
                for k, v in row.items():
                    if k not in ("step", "time") and isinstance(v, (int, float)):
                        self._tb.scalar(k, v, step)
                self._tb.flush()  # TensorBoard shows a step as soon as metrics.jsonl has it
        if self._wandb is not None:
            self._wandb.log(
                {k: v for k, v in row.items() if k not in ("step", "time") and isinstance(v, (int, float))},
                step=int(step),
            )

    def text(self, step: int, tag: str, text: str) -> None:
        if self.enabled and self._tb is not None:
            with self._reporting(f"the text of step {step}"):
                self._tb.text(tag, text, step)
                self._tb.flush()
        if self.enabled and self._wandb is not None:
            import wandb

            self._wandb.log({tag: wandb.Html(f"<pre>{html.escape(text)}</pre>")}, step=int(step))

    def flush(self) -> None:
        """Everything written so far on disk (the JSONL is flushed on every write already)."""
        if not self.enabled or self._failed:
            return
        with self._reporting("the metrics"):
            self._f.flush()
            if self._tb is not None:
                self._tb.flush()

    def sync(self) -> None:
        """flush(), then upload to a URL run_dir given to this writer (no-op otherwise)."""
        self.flush()
        if self._mirror is not None:
            self._mirror.sync()

    def close(self) -> None:
        if not self.enabled:
            return
        try:
            if not self._failed:
                with self._reporting("the metrics"):
                    self._f.close()
                    if self._tb is not None:
                        self._tb.close()
        finally:
            if self._wandb is not None:
                self._wandb.finish()
            if self._mirror is not None:
                self._mirror.close()

    @contextlib.contextmanager
    def _reporting(self, what: str):
        try:
            yield
        except OSError as e:
            if isinstance(e, StorageError):
                raise
            self._failed = True
            self._abandon()
            raise StorageError(
                f"{self.path} (or its tb/ events): could not write {what} ({e.strerror or e}); the rows "
                "before it and the checkpoints are kept. Free space there and rerun the same command to resume "
                "from the last checkpoint"
            ) from e

    def _abandon(self) -> None:
        """Closes the files without another write: a full disk would fail each flush again."""
        for f in (self._f, self._tb):
            try:
                if f is not None:
                    f.close()
            except (OSError, ValueError):
                pass
        self._tb = None


class _EventFile:
    """TensorBoard scalars and text, written in the caller's thread from tensorboardX's own
    parts. Its SummaryWriter writes from a thread of its own, where a full disk is an
    uncaught traceback (and a retry at exit) instead of an error the run can report."""

    def __init__(self, logdir: str, purge_step: Optional[int] = None):
        from tensorboardX.event_file_writer import EventsWriter
        from tensorboardX.proto import event_pb2

        self._pb = event_pb2
        os.makedirs(logdir, exist_ok=True)
        # The file is named by the second and the host, and opened "wb": a writer of the same
        # second (a quick resume) would truncate the previous file. The suffix keeps them
        # apart and in order, which TensorBoard's purge relies on.
        self._w = EventsWriter(os.path.join(logdir, "events"), filename_suffix=f".{time.time_ns()}")
        if purge_step is not None:
            # What SummaryWriter(purge_step=...) writes: TensorBoard drops the events of
            # earlier files from this step on.
            self._add(
                event_pb2.Event(step=purge_step, session_log=event_pb2.SessionLog(status=event_pb2.SessionLog.START))
            )

    def scalar(self, tag: str, value: float, step: int) -> None:
        from tensorboardX.summary import scalar

        self._add(self._pb.Event(summary=scalar(tag, value), step=int(step)))

    def text(self, tag: str, text: str, step: int) -> None:
        from tensorboardX.summary import text as text_summary

        self._add(self._pb.Event(summary=text_summary(tag, text), step=int(step)))

    def _add(self, event) -> None:
        event.wall_time = time.time()
        self._w.write_event(event)

    def flush(self) -> None:
        self._w.flush()

    def close(self) -> None:
        self._w.close()


def truncate_after(path: str, step: int) -> int:
    """Drops the rows of the JSONL at `path` whose step is after `step` (and a last line cut
    short by a kill), rewriting it atomically; returns how many rows were dropped."""
    if not os.path.exists(path):
        return 0
    with open(path) as f:
        lines = f.readlines()
    keep, dropped = [], 0
    for i, line in enumerate(lines):
        try:
            row_step = json.loads(line).get("step")
        except ValueError:
            if i == len(lines) - 1 and not line.endswith("\n"):
                dropped += 1  # a row cut short by the kill
                continue
            row_step = None  # a damaged row in the middle is someone's data: kept as it is
        if isinstance(row_step, int) and row_step > step:
            dropped += 1
            continue
        keep.append(line)
    if dropped:
        tmp = f"{path}.tmp-{os.getpid()}"
        try:
            with open(tmp, "w") as f:
                f.writelines(keep)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except OSError as e:
            with contextlib.suppress(OSError):
                os.remove(tmp)
            raise StorageError(
                f"{path}: could not drop the {dropped} row(s) after step {step} that the resumed "
                f"run logs again ({e.strerror or e}); the file is unchanged. Free space there and "
                "rerun the same command"
            ) from e
        log.info("%s: dropped %d row(s) after step %d, logged again from the checkpoint on", path, dropped, step)
    return dropped


read_jsonl = fileio.read_jsonl  # metrics.jsonl back as a list of dicts
