"""Training: one compiled loop, objectives as loss functions (SFT, DPO family, reward model)."""

from rlaif_jax.train.dpo import DPO, preference_losses
from rlaif_jax.train.optim import make_optimizer
from rlaif_jax.train.reward import RewardModel, bradley_terry_losses
from rlaif_jax.train.sft import SFT
from rlaif_jax.train.step import TrainState, create_state, make_train_step

__all__ = [
    "DPO",
    "RewardModel",
    "SFT",
    "TrainState",
    "bradley_terry_losses",
    "create_state",
    "make_optimizer",
    "make_train_step",
    "preference_losses",
]
