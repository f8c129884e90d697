#!/usr/bin/env python
"""Train any objective (SFT, DPO family, reward model, PPO / RLOO / GRPO) from gin files.

  python scripts/train.py --gin_file=configs/experiments/tiny_sft.gin
  python scripts/train.py --gin_file=configs/experiments/tiny_dpo.gin --gin_param="DPO.beta=0.1"
  python scripts/train.py --gin_file=configs/experiments/tiny_ppo.gin

A config that binds train_ppo runs the PPO loop; any other runs `train`.
Relaunching the same command resumes from the run directory's last checkpoint. The full
and the operative gin configs are written to the run directory.
"""

import sys

from rlaif_jax.cli import main_with_gin, run


def dispatch():
    import gin

    from rlaif_jax.train.loop import train
    from rlaif_jax.train.ppo import train_ppo

    return train_ppo() if "train_ppo." in gin.config_str() else train()


def main(argv=None):
    main_with_gin(__doc__, dispatch, argv)
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
