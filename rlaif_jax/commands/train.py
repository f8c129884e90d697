"""Train an SFT, DPO-family or reward-model objective from gin files (`train`).

  rlaif train --gin_file=configs/experiments/tiny_sft.gin
  rlaif train --gin_file=configs/experiments/tiny_dpo.gin --gin_param="DPO.beta=0.1"

PPO / RLOO / GRPO (`train_ppo`) has its own entry point, scripts/train_ppo.py.
Relaunching the same command resumes from the run directory's last checkpoint. The full
and the operative gin configs are written to the run directory.
"""

import gin

from rlaif_jax.cli import main_with_gin
from rlaif_jax.errors import UserError
from rlaif_jax.train.loop import train


def bound(name: str) -> bool:
    """Whether the parsed gin config binds `name` (configurable.parameter)."""

    try:
        gin.query_parameter(name)
    except ValueError:
        return False
    return True


def train_main():

    if not bound("train.run_dir") and bound("train_ppo.run_dir"):
        raise UserError(
            "this config binds train_ppo, not train: run it with `rlaif ppo` (scripts/train_ppo.py in a clone)"
        )
    return train()


def main(argv=None):
    main_with_gin(__doc__, train_main, argv)
    return 0
