"""Training: one compiled loop, objectives as loss functions (SFT, DPO family, KTO, ORPO, CPO,
reward model)."""

from rlaif_jax.train.cpo import CPO
from rlaif_jax.train.dpo import DPO, preference_losses
from rlaif_jax.train.kto import KTO
from rlaif_jax.train.optim import make_optimizer
from rlaif_jax.train.orpo import ORPO
from rlaif_jax.train.reward import RewardModel, bradley_terry_losses
from rlaif_jax.train.sft import SFT
from rlaif_jax.train.step import TrainState, create_state, make_train_step

__all__ = [
    "CPO",
    "DPO",
    "KTO",
    "ORPO",
    "RewardModel",
    "SFT",
    "TrainState",
    "bradley_terry_losses",
    "create_state",
    "make_optimizer",
    "make_train_step",
    "preference_losses",
]
