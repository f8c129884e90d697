"""PPO / RLOO / GRPO from gin files (`train_ppo`): an SFT policy against a reward model.

  rlaif ppo --gin_file=configs/experiments/tiny_ppo.gin
  rlaif ppo --gin_file=configs/experiments/tiny_ppo.gin --gin_param="KLController.init_coef=0.1"

SFT, DPO-family and reward-model objectives (`train`) run with scripts/train.py.
Relaunching the same command resumes from the run directory's last checkpoint. The full
and the operative gin configs are written to the run directory.
"""

from rlaif_jax.cli import main_with_gin
from rlaif_jax.train.ppo import train_ppo


def train_ppo_main():

    return train_ppo()


def main(argv=None):
    main_with_gin(__doc__, train_ppo_main, argv)
    return 0
