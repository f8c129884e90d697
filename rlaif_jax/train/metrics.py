"""Metric sinks (JSONL, TensorBoard event files and, optionally, Weights & Biases) and MFU
accounting."""

from __future__ import annotations

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

log = logging.getLogger(__name__)

# Dense bf16 peak TFLOP/s per device (vendor figures), for MFU.
PEAK_TFLOPS = {
    "TPU v4": 275.0, "TPU v5 lite": 197.0, "TPU v5e": 197.0, "TPU v5p": 459.0, "TPU v6": 918.0,
    "NVIDIA H100": 989.0, "NVIDIA H200": 989.0, "NVIDIA A100": 312.0, "NVIDIA L4": 121.0,
}


def peak_tflops(device=None, override: Optional[float] = None) -> Optional[float]:
    """Per-device peak, or None where unknown (CPUs): MFU is then not reported."""
    if override:
        return override
    kind = getattr(device or jax.devices()[0], "device_kind", "")
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
            raise ImportError("WandbLogging.enabled = True needs wandb: pip install -e \".[wandb]\" "
                              "(or unbind WandbLogging.enabled)") from None
        id_file = os.path.join(run_dir, "wandb_run_id.txt")
        if os.path.exists(id_file):
            with open(id_file) as f:
                run_id = f.read().strip()
        else:
            run_id = uuid.uuid4().hex[:12]  # W&B run ids: lowercase letters and digits
            with open(id_file, "w") as f:
                f.write(run_id + "\n")
        return wandb.init(project=self.project, entity=self.entity, group=self.group, tags=list(self.tags) or None,
                          name=self.name or os.path.basename(os.path.normpath(run_dir)), mode=self.mode,
                          dir=run_dir, id=run_id, resume="allow", reinit="create_new")


class MetricsWriter:
    """Appends one JSON object per logged step to metrics.jsonl and mirrors scalars to
    TensorBoard (tensorboardX) when installed, and to Weights & Biases when WandbLogging is
    enabled, under the same names everywhere. Only process 0 writes.

    A URL run_dir (gs://...) is staged locally and uploaded by `sync()` and `close()`
    (object stores cannot append; see rlaif_jax.train.rundir). The trainers stage the whole
    run directory themselves and pass the local staging path here."""

    def __init__(self, run_dir: str, filename: str = "metrics.jsonl", wandb: Optional[WandbLogging] = None):
        self.enabled = jax.process_index() == 0
        self._tb = None
        self._wandb = None
        self._mirror = None
        if not self.enabled:
            return
        if fileio.is_url(run_dir):
            from rlaif_jax.train.rundir import RunDir

            self._mirror = RunDir(run_dir, pull=(filename,))
            run_dir = self._mirror.local
        os.makedirs(run_dir, exist_ok=True)
        self._f = open(os.path.join(run_dir, filename), "a")
        try:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(os.path.join(run_dir, "tb"))
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
        self._f.write(json.dumps(row) + "\n")
        self._f.flush()
        if self._tb is not None:
            for k, v in row.items():
                if k not in ("step", "time") and isinstance(v, (int, float)):
                    self._tb.add_scalar(k, v, step)
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in row.items() if k not in ("step", "time") and isinstance(v, (int, float))},
                            step=int(step))

    def text(self, step: int, tag: str, text: str) -> None:
        if self.enabled and self._tb is not None:
            self._tb.add_text(tag, text, step)
        if self.enabled and self._wandb is not None:
            import wandb

            self._wandb.log({tag: wandb.Html(f"<pre>{html.escape(text)}</pre>")}, step=int(step))

    def flush(self) -> None:
        """Everything written so far on disk (the JSONL is flushed on every write already)."""
        if not self.enabled:
            return
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
        self._f.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
        if self._mirror is not None:
            self._mirror.close()


read_jsonl = fileio.read_jsonl  # metrics.jsonl back as a list of dicts
