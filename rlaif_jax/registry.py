"""The stage registry: every pipeline stage declared once as a small frozen record, and the
one runner that walks a run's stages.

A record says what a stage reads and writes (paths relative to the run's directories),
which file marks its output done, whether process 0 runs it alone on a multi-host slice,
which numbers of its output go into the run's summary, and the function that does the work.
Both orchestrators build on it: a chained arm (rlaif_jax.arm) walks ARM_STAGES, and the
miniature (rlaif_jax.miniature) walks its arms over the synthetic world through its own
records with the same runner and the same done markers.

The runner records each stage's state in status.json (running, then done / reused / skipped,
or failed with the error, so a relaunch resumes at that stage), runs a host-0 stage on
process 0 while the other processes wait at a coordination-service barrier, and calls each
stage inside a gin scope of its name (so a recipe binds `dpo/make_optimizer.learning_rate`
beside `sft/make_optimizer.learning_rate`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import time
import traceback
from typing import Any, Callable, Mapping, Optional, Sequence

import gin
import jax

from rlaif_jax import fileio
from rlaif_jax.fileio import read_json, write_json

# What marks an output complete: record sets end with their manifest, training runs with
# summary.json (after hf/ is exported), evaluations with metrics.json. Each is written last,
# so an output that has one is whole and a killed stage's output has none.
DONE_FILES = ("manifest.json", "summary.json", "metrics.json")


def is_complete(path: str) -> bool:
    """Whether a stage's output at `path` is done (holds one of DONE_FILES)."""
    return any(fileio.exists(fileio.join(path, f)) for f in DONE_FILES)


@dataclasses.dataclass(frozen=True)
class Stage:
    """One stage of a pipeline, declared once.

    name:         the stage's name: its status.json entry and the gin scope it runs in.
    run:          run(ctx) -> outcome dict for status.json ("state" defaults to "done");
                  ctx is the run (an arm) that resolves paths and holds the settings.
    inputs:       the outputs of earlier stages it reads (keys of their `outputs`).
    outputs:      (key, path) pairs: where it writes, relative to the run's out_dir unless
                  the run places the key elsewhere (an arm's stage_dirs, shared data).
    done:         the file its outputs write last (DONE_FILES); removed again when a
                  finished output must not be reused (too many failed API requests).
    host0:        process 0 runs it alone on a multi-host slice (API requests, record
                  rewrites, one-host sampling) while the others wait.
    summary_keys: numbers of its output that go into the run's summary.json.
    scope:        the gin scope it runs in alone, replacing the scopes around it (a round of
                  iterative RLAIF runs `round2/dpo` in scope `dpo`, so the recipe's
                  `dpo/...` bindings hold in every round); None: its name, inside them.
    """

    name: str
    run: Callable[[Any], dict]
    inputs: tuple[str, ...] = ()
    outputs: tuple[tuple[str, str], ...] = ()
    done: str = "manifest.json"
    host0: bool = False
    summary_keys: tuple[str, ...] = ()
    scope: Optional[str] = None

    def output(self, key: Optional[str] = None) -> str:
        """The relative path of output `key` (default: the stage's first output)."""
        paths = dict(self.outputs)
        return paths[key] if key is not None else self.outputs[0][1]


def by_name(stages: Sequence[Stage]) -> dict[str, Stage]:
    return {s.name: s for s in stages}


def output_paths(stages: Sequence[Stage]) -> dict[str, str]:
    """Every output key of a registry -> its path relative to the run's out_dir."""
    return {k: p for s in stages for k, p in s.outputs}


class Status:
    """status.json: one entry per stage, rewritten atomically at every change (by process 0;
    None for a run that keeps no status file)."""

    def __init__(self, path: Optional[str]):
        self.path = path
        self.stages: dict = read_json(path).get("stages", {}) if path and fileio.exists(path) else {}

    def set(self, stage: str, **fields) -> None:
        fields["updated"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        self.stages[stage] = fields
        if self.path and jax.process_index() == 0:
            write_json(self.path, {"stages": self.stages})


def barrier(name: str, timeout_s: float) -> None:
    """All processes wait here. Uses the coordination service's barrier, with a timeout
    long enough for process 0 to sample or query an API for hours, rather than a device
    collective that would sit blocked in XLA meanwhile."""
    if jax.process_count() == 1:
        return
    from jax._src import distributed

    client = distributed.global_state.client
    if client is None:  # pragma: no cover - multi-process without jax.distributed
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
        return
    client.wait_at_barrier(name, int(timeout_s * 1000))


class Runner:
    """Walks one run's stages: status, gin scope, host-0 stages and the barriers after them.

    Args:
      name: the run's name (barrier names: every process of a slice walks the same stages).
      status: the run's status.json (Status(None) keeps none).
      timeout_s: how long the other processes wait while process 0 runs a host-0 stage.
    """

    def __init__(self, name: str, status: Status, timeout_s: float):
        self.name = name
        self.status = status
        self.timeout_s = timeout_s
        self._barriers = 0

    def run(self, stages: Sequence[Stage], ctx: Any) -> None:
        for stage in stages:
            self.run_stage(stage, ctx)

    def run_stage(self, stage: Stage, ctx: Any) -> None:
        if stage.host0 and jax.process_index() != 0:
            self.wait(stage.name)
            return
        t0 = time.time()
        self.status.set(stage.name, state="running")
        try:
            with _scope(stage):
                outcome = dict(stage.run(ctx))
        except BaseException as e:
            # The error stays on record beside the outputs already written; relaunching the
            # run resumes at this stage.
            self.status.set(
                stage.name,
                state="failed",
                error=f"{type(e).__name__}: {e}",
                traceback=traceback.format_exc(limit=8),
                seconds=round(time.time() - t0, 1),
            )
            raise
        self.status.set(stage.name, state=outcome.pop("state", "done"), seconds=round(time.time() - t0, 1), **outcome)
        self.wait(stage.name)

    def wait(self, what: str) -> None:
        self._barriers += 1
        barrier(f"rlaif_arm/{self.name}/{what}/{self._barriers}", self.timeout_s)


@contextlib.contextmanager
def _scope(stage: Stage):
    if stage.scope is None:
        with gin.config_scope(stage.name):
            yield
    else:
        # gin matches a binding's scope against the prefixes of the active scopes, so a
        # stage nested in another's scope would miss `dpo/...`: it runs in its own alone.
        with gin.config_scope(None), gin.config_scope(stage.scope):
            yield


def summary_values(summary: Mapping[str, Any], prefix: str, keys: Sequence[str]) -> dict:
    """`keys` of a stage's summary.json as `prefix/key` entries of the run's summary."""
    return {f"{prefix}/{k}": summary[k] for k in keys if k in summary}
