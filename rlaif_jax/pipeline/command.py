"""Run (or resume) one arm of the paper, every stage chained: prompts -> teacher -> SFT ->
policy samples -> critic -> preferences -> DPO | reward model -> PPO -> evaluate.

  python scripts/run_arm.py --gin_file=configs/models/llama2_7b.gin --gin_file=configs/mesh/tpu_v4_32.gin \\
    --gin_file=configs/experiments/paper/arms/dpo_gpt4_on_sft_gpt35_10pct.gin \\
    --gin_param="HF_DIR='/ckpt/Llama-2-7b-hf'" --gin_param="ARM_DIR='runs/paper/llama2_7b/dpo_gpt4'"

Relaunching the same command skips finished stages and resumes the unfinished one;
ARM_DIR/status.json says which stage ran, was reused, or failed (with the error), and
ARM_DIR/summary.json holds the arm's numbers (what scripts/sweep.py tabulates).
"""

from __future__ import annotations

from typing import Optional, Sequence

from rlaif_jax.cli import main_with_gin
from rlaif_jax.pipeline.arm import run_arm


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The arm's command line: gin files and bindings, then run_arm(); 0 when it finished."""
    main_with_gin(__doc__, lambda: run_arm(), argv)
    return 0
