"""The one orchestrator: an arm of the paper (or the miniature's, in its synthetic world) as a
chained, resumable run of stages.

  settings  ArmSettings, gin's `run_arm` configurable
  runner    Stage records, status.json, input checks, multi-host barriers
  context   the arm and its rounds as the stages see them (paths, seeds, the summary)
  stages    the stage functions
  order     the stage order (the one module that knows it)
  arm       run_arm: one arm from its settings
  command   `scripts/run_arm.py` / `rlaif arm`
"""

from rlaif_jax.pipeline.arm import run_arm
from rlaif_jax.pipeline.order import ARM_STAGES, STAGES
from rlaif_jax.pipeline.settings import ArmError, ArmSettings

__all__ = ["ARM_STAGES", "STAGES", "ArmError", "ArmSettings", "run_arm"]
