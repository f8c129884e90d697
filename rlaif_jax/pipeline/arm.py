"""One arm of the paper as one chained, resumable run (the stages and their order:
rlaif_jax.pipeline.order).

Each stage runs inside a gin scope of its name, so an arm's recipe binds e.g.
`sft/make_optimizer.learning_rate = 1e-6` beside `dpo/make_optimizer.learning_rate = 1e-7`,
while unscoped bindings (batch size, max length) hold for every stage.

Shared data (prompts and teacher completions) lives under `data_dir` and is reused by every
arm that points there; everything the arm trains or judges lives under `out_dir`. A stage
whose output is complete is not run again, and API answers are cached per role
(teacher-<model>, critic, judge) under cache_dir (default data_dir/api_cache), so a killed or
failed arm is relaunched with the same command and nothing already paid for is paid again.
`status.json` records each stage's state (done, reused, skipped, failed with the error) as
the arm goes; `summary.json` its numbers.

On a multi-host slice every process runs the arm: training stages span all hosts, the
samples stage splits its prompts over them, and the API / record stages run on process 0
while the others wait at a coordination-service barrier.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Callable, Optional, Sequence

import jax

from rlaif_jax import fileio
from rlaif_jax.data.records import PREFERENCES
from rlaif_jax.iterative import IterativeSettings
from rlaif_jax.pipeline import order
from rlaif_jax.pipeline.context import Arm, default_cache_dir
from rlaif_jax.pipeline.runner import Runner, Stage, Status
from rlaif_jax.pipeline.settings import ArmSettings
from rlaif_jax.preflight import pipeline_checks, run_preflight, saved_tokenizer


def layout(settings: ArmSettings) -> Arm:
    """An arm as the stages see it, for its paths alone (nothing is run or written)."""
    return Arm(settings, Runner("layout", Status(None), 0.0), order.REGISTRY, order.round_stages)


def arm_preflight(stages: Sequence[Stage], arm: Arm) -> None:
    """Before the first stage: the base model against the tokenizer saved with it, and every
    preference set the arm is handed ready-made (run_arm.stage_dirs, e.g. released
    annotations or another arm's pairs) for emptiness, duplicate ids and tied pairs. Sets a
    stage of this arm writes are checked by the trainer that reads them."""
    s = arm.settings
    running = {stage.name for stage in stages}
    models = {}
    if s.base_model and os.path.isdir(s.base_model) and saved_tokenizer(s.base_model) is not None:
        models["run_arm.base_model"] = s.base_model
    records = {
        f"run_arm.stage_dirs[{key!r}]": (s.stage_dirs[key], PREFERENCES)
        for key in ("preferences", "rm_preferences")
        if s.stage_dirs.get(key) and "preferences" not in running
    }
    run_preflight(pipeline_checks(models, record_sets=records))


def run_arm(
    settings: Optional[ArmSettings] = None,
    preflight: Callable[[Sequence[Stage], Any], None] = arm_preflight,
) -> dict:
    """Runs (or resumes) one arm; returns its summary (also out_dir/summary.json).

    Args:
      settings: the arm; None builds ArmSettings from gin's `run_arm.*` bindings.
      preflight: preflight(stages, arm), run before the first stage (see Runner).
    """
    s = settings if settings is not None else ArmSettings()
    if not s.cache_dir:
        s = dataclasses.replace(s, cache_dir=default_cache_dir(s.data_dir))
    if s.iterative is None and "rounds" in s.stages:
        s = dataclasses.replace(s, iterative=IterativeSettings())  # gin's bindings, built once here
    stages = order.plan(s)
    fileio.makedirs(s.out_dir)
    t0 = time.time()
    name = os.path.basename(os.path.normpath(s.out_dir))
    runner = Runner(name, Status(fileio.join(s.out_dir, "status.json")), s.host0_timeout_s, preflight)
    arm = Arm(s, runner, order.REGISTRY, order.round_stages)
    runner.run(stages, arm)
    summary = {
        "arm": arm.name,
        "policy": arm.policy(),
        "stages": list(s.stages),
        "sft_teacher": s.sft_teacher,
        "sft_data": arm.sft_data_label(),
        "pair_teacher": s.pair_teacher,
        **s.labels,
        **arm.results,
        "seconds": round(time.time() - t0, 1),
    }
    if jax.process_index() == 0:
        fileio.write_json(fileio.join(s.out_dir, "summary.json"), summary)
    return summary
