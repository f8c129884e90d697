"""The one runner every pipeline walks: stage records, status.json, the multi-host barriers.

A Stage record says what a stage reads and writes (keys its run resolves to paths), which
file marks its output done, whether process 0 runs it alone on a multi-host slice, which
numbers of its output go into the run's summary, and the function that does the work. The
runner, for each stage in order:

  - skips it when every output is complete (state "reused"), still reading its numbers;
  - else checks its declared inputs (a missing input is one error naming the stage and the
    path) and runs it;
  - records the state in status.json (running, then done / reused / skipped, or failed with
    the error, so a relaunch resumes at that stage);
  - runs a host-0 stage on process 0 while the other processes wait at a coordination-service
    barrier, and every stage inside a gin scope of its name (so a recipe binds
    `dpo/make_optimizer.learning_rate` beside `sft/make_optimizer.learning_rate`).

What the runner asks of a run (the `ctx` handed to every stage, with the stage's record):
  ctx.outputs(stage) -> paths that, all complete, make the stage done (empty: always run)
  ctx.input_path(key) -> the path input `key` is read from, or None when this run does not need it
  ctx.input_name(key) -> what that input is, for the error ("policy samples")
  ctx.input_hint(key) -> how to get it ("add 'samples' to run_arm.stages")
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import time
import traceback
from typing import Any, Callable, Optional, Sequence

import gin
import jax
from jax._src import distributed
from jax.experimental import multihost_utils

from rlaif_jax import fileio
from rlaif_jax.errors import UserError
from rlaif_jax.fileio import read_json, write_json

# What marks an output complete: record sets end with their manifest, training runs with
# summary.json (after hf/ is exported), evaluations with metrics.json. Each is written last
# (atomically), so an output that has one is whole and a killed stage's output has none.
DONE_FILES = ("manifest.json", "summary.json", "metrics.json")


def is_complete(path: str) -> bool:
    """Whether a stage's output at `path` is done (holds one of DONE_FILES)."""
    return any(fileio.exists(fileio.join(path, f)) for f in DONE_FILES)


class MissingInput(UserError):
    """A stage's declared input is not there (names the stage, the path and the fix)."""


@dataclasses.dataclass(frozen=True)
class Stage:
    """One stage of a pipeline, declared once.

    name:         its status.json entry and the gin scope it runs in.
    run:          run(ctx, stage) -> outcome dict for status.json ("state" defaults to "done").
    inputs:       keys of what it reads, resolved by ctx.input_path; checked before it runs.
    outputs:      (key, path) pairs: where it writes, relative to the run's out_dir unless
                  the run places the key elsewhere (an arm's stage_dirs, shared data).
    done:         the file its outputs write last (DONE_FILES); removed again when a
                  finished output must not be reused (too many failed API requests).
    host0:        process 0 runs it alone on a multi-host slice (API requests, record
                  rewrites, one-host sampling) while the others wait.
    summary_keys: numbers of its training run's summary.json that go into the run's summary.
    scope:        the gin scope it runs in alone, replacing the scopes around it (a round of
                  iterative RLAIF runs `round2/dpo` in scope `dpo`, so the recipe's
                  `dpo/...` bindings hold in every round); None: its name, inside them.
    report:       report(ctx, stage) -> extra outcome fields: reads a finished output's numbers
                  into the run's summary, after a run and when the output is reused.
    """

    name: str
    run: Callable[[Any, "Stage"], dict]
    inputs: tuple[str, ...] = ()
    outputs: tuple[tuple[str, str], ...] = ()
    done: str = "manifest.json"
    host0: bool = False
    summary_keys: tuple[str, ...] = ()
    scope: Optional[str] = None
    report: Optional[Callable[[Any, "Stage"], Optional[dict]]] = None


def by_name(stages: Sequence[Stage]) -> dict[str, Stage]:
    return {s.name: s for s in stages}


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
    client = distributed.global_state.client
    if client is None:  # pragma: no cover - multi-process without jax.distributed
        multihost_utils.sync_global_devices(name)
        return
    client.wait_at_barrier(name, int(timeout_s * 1000))


def no_preflight(stages: Sequence[Stage], ctx: Any) -> None:
    """The default preflight: nothing to check before the first stage."""


class Runner:
    """Walks one run's stages: skip or check and run, status, gin scope, host-0 stages and
    the barriers after them.

    Args:
      name: the run's name (barrier names: every process of a slice walks the same stages).
      status: the run's status.json (Status(None) keeps none).
      timeout_s: how long the other processes wait while process 0 runs a host-0 stage.
      preflight: preflight(stages, ctx), called once before the first stage of `run` (the
        checks of a run's models, tokenizers and input records that should fail in seconds,
        not hours into a run); raises to stop the run before anything is written.
    """

    def __init__(
        self,
        name: str,
        status: Status,
        timeout_s: float,
        preflight: Callable[[Sequence[Stage], Any], None] = no_preflight,
    ):
        self.name = name
        self.status = status
        self.timeout_s = timeout_s
        self.preflight = preflight
        # The gin scope the run was started in (the miniature runs its arms in `miniature`):
        # a stage with a scope of its own runs in that scope under this one.
        self.base_scope = gin.current_scope()
        self._barriers = 0

    def run(self, stages: Sequence[Stage], ctx: Any) -> None:
        self.preflight(stages, ctx)
        for stage in stages:
            self.run_stage(stage, ctx)

    def run_stage(self, stage: Stage, ctx: Any) -> None:
        if stage.host0 and jax.process_index() != 0:
            self.wait(stage.name)
            return
        t0 = time.time()
        self.status.set(stage.name, state="running")
        try:
            with _scope(stage, self.base_scope):
                outputs = ctx.outputs(stage)
                if outputs and all(is_complete(p) for p in outputs):
                    outcome = {"state": "reused", "output": outputs[0]}
                else:
                    check_inputs(stage, ctx)
                    outcome = dict(stage.run(ctx, stage))
                if stage.report is not None and outcome.get("state") != "skipped":
                    outcome.update(stage.report(ctx, stage) or {})
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


def check_inputs(stage: Stage, ctx: Any) -> None:
    """Every input the stage declares, where this run needs it, is complete on disk."""
    for key in stage.inputs:
        path = ctx.input_path(key)
        if path is not None and not is_complete(path):
            raise MissingInput(
                f"stage {stage.name!r}: {ctx.input_name(key)} not found at {path} ({ctx.input_hint(key)})"
            )


@contextlib.contextmanager
def _scope(stage: Stage, base: list):
    if stage.scope is None:
        with gin.config_scope(stage.name):
            yield
    else:
        # gin matches a binding's scope against the prefixes of the active scopes, so a
        # stage nested in another's scope would miss `dpo/...`: it runs in its own, under the
        # run's.
        with gin.config_scope(None), gin.config_scope(base + [stage.scope]):
            yield
