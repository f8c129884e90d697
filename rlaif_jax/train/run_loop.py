"""The run loop `train` and `train_ppo` share: a run directory held from start to end, exact
resume, periodic checkpoints, metrics, the progress bar, the final checkpoint, the operative
config, the HF export and summary.json.

A trainer builds its state, data and compiled step (a `Plan`) and hands the loop a per-step
callable; the loop calls it once per batch and touches the host only to feed batches and,
every `log_every` steps, to fetch metrics. That is also when a non-finite loss is noticed
(the step records it on device in TrainState.nonfinite_step): the run stops naming the step
and the data position, before any checkpoint of the bad state is written.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import logging
import time
from typing import Any, Callable, Iterator, Optional

import gin
import jax
import numpy as np
from tqdm.auto import tqdm

from rlaif_jax import fileio
from rlaif_jax.errors import StorageError, binding, non_negative, whole
from rlaif_jax.interrupt import graceful
from rlaif_jax.outputs import writer_lock
from rlaif_jax.train.checkpoint import Checkpointer, abstract_like
from rlaif_jax.train.metrics import MetricsWriter
from rlaif_jax.train.rundir import RunDir
from rlaif_jax.train.step import TrainState

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    pass


@gin.configurable
@dataclasses.dataclass(frozen=True)
class LoopSettings:
    """How a run logs, checkpoints and exports; the same for every trainer.

    Built when the trainer starts (unless passed), so gin binds `LoopSettings.<field>`;
    a scoped binding (`ppo/LoopSettings.log_every`) sets one stage of an arm.
    """

    # Steps between metrics rows (and host checks for a non-finite loss). None: the
    # trainer's default, every 10 steps for `train`, every iteration for `train_ppo`.
    log_every: Optional[int] = None
    checkpoint_every: int = 0  # 0: only the final checkpoint
    keep_checkpoints: int = 3
    async_checkpoint: bool = True
    export_hf: bool = True  # the final weights as an HF directory in run_dir/hf
    # On SIGINT / SIGTERM (a preemption) the run stops after the current step and writes a
    # checkpoint of it if the last one is older than this many minutes (0: always).
    stop_checkpoint_after_min: float = 5.0

    def __post_init__(self):
        b = lambda p: binding(f"LoopSettings.{p}")  # noqa: E731
        if self.log_every is not None:
            whole(b("log_every"), self.log_every, 1, hint="> 0, or None for the trainer's default")
        whole(b("checkpoint_every"), self.checkpoint_every, 0, hint=">= 0; 0 saves at the end only")
        whole(b("keep_checkpoints"), self.keep_checkpoints, 1)
        non_negative(b("stop_checkpoint_after_min"), self.stop_checkpoint_after_min)

    def every(self, default: int) -> int:
        """log_every, or the trainer's default when unset."""
        return default if self.log_every is None else self.log_every


def check_length(name: str, num_steps, stop_after=None, optional: bool = False) -> None:
    """A trainer's length (`train.num_steps`, `train_ppo.num_iterations`) and stop_after."""
    if num_steps is not None or not optional:
        whole(binding(name), num_steps, 1, hint="> 0, or None to run until the data ends" if optional else "")
    if stop_after is not None:
        whole("stop_after", stop_after, 1)


@contextlib.contextmanager
def run_lock(run_dir: str, binding_name: str) -> Iterator[None]:
    """The run directory's writer lock, held by process 0 for the whole run: a second trainer
    on the same run_dir would interleave checkpoints and metrics with this one."""
    if jax.process_index() != 0:
        yield
        return
    with writer_lock(run_dir, binding_name):
        yield


class Closing:
    """Closes what a run opened, last opened first, when the block ends. While an error is on
    its way out, a closer's own failure (the same full disk, say) is logged in one line rather
    than raised: it would hide that error. Otherwise the first failure is raised after every
    closer ran."""

    def __init__(self, *closers: Optional[Callable[[], Any]]):
        self._closers: list = []
        for c in closers:
            self.add(c)

    def add(self, closer: Optional[Callable[[], Any]]) -> None:
        if closer is not None:
            self._closers.append(closer)

    def __enter__(self) -> "Closing":
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        first = None
        for close in reversed(self._closers):
            try:
                close()
            except Exception as e:
                if exc is not None:
                    log.warning("while stopping after the error below: %s", " ".join(str(e).split()))
                elif first is None:
                    first = e
        if first is not None:
            raise first
        return False


@dataclasses.dataclass(frozen=True)
class RunKind:
    """What the loop's files and messages call a trainer's runs."""

    name: str  # the gin configurable: its run_dir binding names the writer lock
    unit: str  # "step" | "iteration": summary.json's and the export's key, error messages
    data: str  # the data in error messages: "data iterator", "prompt stream"
    default_log_every: int
    desc: str  # the progress bar's


@dataclasses.dataclass
class Plan:
    """What a trainer hands the loop (built by its `build(data_state, closing)`).

    state:     the fresh TrainState (the loop restores a checkpoint over it)
    data:      the data iterator; data.get_state() is the position a checkpoint stores
    batches:   (position before the batch, host batch) pairs until the data ends
    step:      step(state, host batch) -> (state, device metrics); the state is donated
    summarize: summarize(device metrics, host batches since the last row, seconds since
               the last row) -> the row of floats written to metrics.jsonl
    export:    export(hf directory, state) writes the HF model
    postfix:   the progress bar's fields for a row
    after_step: after_step(state, step, writer) -> extra metrics for the summary (eval), or None
    """

    state: TrainState
    data: Any
    batches: Iterator[tuple[Any, Any]]
    step: Callable[[TrainState, Any], tuple[TrainState, Any]]
    summarize: Callable[[Any, list, float], dict]
    export: Callable[[str, TrainState], None]
    postfix: Callable[[dict], dict] = lambda m: {}
    after_step: Optional[Callable[[TrainState, int, MetricsWriter], Optional[dict]]] = None
    num_steps: Optional[int] = None  # None: until the data ends


def run(
    run_dir: str,
    kind: RunKind,
    settings: LoopSettings,
    build: Callable[[Optional[dict], Closing], Plan],
    stop_after: Optional[int] = None,
) -> dict:
    """Run a trainer in run_dir, holding its writer lock; resumes from its last checkpoint.

    run_dir may be a URL (gs://...): checkpoints go there through orbax, everything else is
    staged locally and mirrored there at each checkpoint and at the end (rlaif_jax.train.rundir).
    `build(data_state, closing)` loads the trainer's data (from `data_state`, the checkpointed
    iterator position, or the start when None) and models, registering what must be closed.
    `stop_after` ends the loop early without a final checkpoint: preemption in tests.

    Returns the summary ({kind.unit: last step, **last logged metrics}), also written to
    run_dir/summary.json; after `stop_after`, the last logged metrics.
    """
    with run_lock(run_dir, binding(f"{kind.name}.run_dir")):
        rd = RunDir(run_dir)
        with Closing(rd.close):  # a URL run_dir: the last upload, also after an error
            return _run(rd, kind, settings, build, stop_after)


def _run(rd: RunDir, kind: RunKind, settings: LoopSettings, build, stop_after) -> dict:
    log_every = settings.every(kind.default_log_every)
    ckpt = Checkpointer(fileio.join(rd.path, "checkpoints"), settings.keep_checkpoints, settings.async_checkpoint)
    with Closing(ckpt.close) as closing, graceful() as stop:
        try:
            latest = ckpt.latest_step()
            plan = build((ckpt.restore_data(latest) if latest is not None else None) or None, closing)
            state, num_steps = plan.state, plan.num_steps
            if latest is not None:
                state, _, _ = ckpt.restore(latest, abstract_like(state))
                log.info("resumed from %s at %s %d", ckpt.directory, kind.unit, int(jax.device_get(state.step)))
            start = int(jax.device_get(state.step))
            writer = MetricsWriter(rd.local, resume_step=start)
            closing.add(writer.close)
            rd.write_text("config.gin", gin.config_str())
            rd.sync(writer)

            recent: collections.deque = collections.deque(maxlen=log_every)
            last: dict = {}
            t_last, steps_since = time.perf_counter(), 0
            bar = tqdm(total=num_steps, initial=start, desc=kind.desc, disable=jax.process_index() != 0)
            closing.add(bar.close)
            step = start
            metrics = None
            saved_step, saved_at = latest, time.monotonic()

            def write_row() -> dict:
                nonlocal t_last, steps_since
                _check_finite(state, recent, rd, kind)
                m = plan.summarize(
                    metrics, [b for _, _, b in list(recent)[-steps_since:]], time.perf_counter() - t_last
                )
                writer.write(step, m)
                bar.set_postfix(plan.postfix(m))
                t_last, steps_since = time.perf_counter(), 0
                return m

            while num_steps is None or step < num_steps:
                nxt = next(plan.batches, None)
                if nxt is None:
                    if num_steps is not None:
                        log.warning("training data exhausted after %d steps (num_steps=%d)", step, num_steps)
                    break
                position, batch = nxt
                recent.append((step, position, batch))
                steps_since += 1
                state, metrics = plan.step(state, batch)
                step += 1
                bar.update(1)

                if step % log_every == 0 or step == num_steps:
                    last = write_row()
                if plan.after_step is not None:
                    last.update(plan.after_step(state, step, writer) or {})
                if settings.checkpoint_every and step % settings.checkpoint_every == 0 and step != num_steps:
                    _check_finite(state, recent, rd, kind)
                    ckpt.save(step, state, plan.data.get_state())
                    rd.sync(writer)
                    saved_step, saved_at = step, time.monotonic()
                if stop.requested:
                    old = saved_step is None or time.monotonic() - saved_at >= 60 * settings.stop_checkpoint_after_min
                    if old and saved_step != step:
                        _check_finite(state, recent, rd, kind)
                        ckpt.save(step, state, plan.data.get_state())
                        saved_step = step
                    ckpt.wait()
                    rd.sync(writer)
                    raise stop.interrupted(
                        f"at {kind.unit} {step}; the checkpoint of {kind.unit} {saved_step} is in "
                        f"{ckpt.directory}: rerun the same command to resume from it"
                    )
                if stop_after is not None and step >= stop_after:
                    ckpt.wait()
                    return last
            if steps_since:  # the data ran out between two logging steps
                last = {**last, **write_row()}
            _check_finite(state, recent, rd, kind)
            if ckpt.latest_step() != step:  # a rerun of a finished run (killed in its export) has it
                ckpt.save(step, state, plan.data.get_state())
            ckpt.wait()
            rd.write_text("operative_config.gin", gin.operative_config_str())
            rd.sync(writer)
            if settings.export_hf:
                rd.export_hf(lambda d: plan.export(d, state), info={kind.unit: step})
            summary = {kind.unit: step, **last}
            rd.write_text("summary.json", json.dumps(summary, indent=2))  # last: on a URL, after hf/ is complete
            return summary
        except StorageError:
            # A save failing in the background fills the disk, and the next write to fail may
            # be a metrics row: report the checkpoint (the cause) if it failed.
            ckpt.wait()
            raise


def _check_finite(state: TrainState, recent: collections.deque, run_dir: RunDir, kind: RunKind) -> None:
    """Raises NonFiniteLossError if a step since the start recorded a non-finite loss or
    gradient, naming it and its data position and saving its batch (when still recent)."""
    bad = int(jax.device_get(state.nonfinite_step))
    if bad < 0:
        return
    where = next((pos for s, pos, _ in recent if s == bad), None)
    batch = next((b for s, _, b in recent if s == bad), None)
    dump = None
    if batch is not None and jax.process_index() == 0:
        name = f"nonfinite_batch_{kind.unit}{bad}.npz"
        arrays = batch if isinstance(batch, dict) else {f"arr_{i}": x for i, x in enumerate(batch)}
        np.savez(run_dir.local_path(name), **arrays)
        dump = run_dir.url(name)  # a URL run_dir gets it when the run closes
    raise NonFiniteLossError(
        f"loss or gradient became non-finite at {kind.unit} {bad} ({kind.data} position before that "
        f"batch: {where}; batch saved to {dump}). That update was not applied and no checkpoint "
        "of it was written; the last good checkpoint is intact."
    )
