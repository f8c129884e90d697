"""Bradley-Terry reward model: a scalar head on the decoder, read at each sequence's last
token, trained on preference pairs."""

from __future__ import annotations

import dataclasses

import gin
import jax
import jax.numpy as jnp

from rlaif_jax.errors import binding, non_negative
from rlaif_jax.models.heads import SCORE_HEAD
from rlaif_jax.models.params import apply, gather_last
from rlaif_jax.train.objectives import add_moe_aux_loss, concat_pairs, mean_metric, train_rngs


def bradley_terry_losses(r_chosen, r_rejected, margin=0.0):
    return -jax.nn.log_sigmoid(r_chosen - r_rejected - margin)


def sequence_rewards(model, params, tokens, positions, segment_ids):
    """[B] reward of each (right-padded, unpacked) row under a reward model."""
    out = apply(model, params, tokens, positions, segment_ids)
    return gather_last(out[SCORE_HEAD], segment_ids)


@gin.configurable
@dataclasses.dataclass(frozen=True)
class RewardModel:
    # Required gap between chosen and rejected rewards (0 = plain Bradley-Terry).
    margin: float = 0.0
    # Pulls mean rewards towards 0 (TRL's center_rewards_coefficient): BT is shift-invariant,
    # and PPO is easier to tune on centred scores.
    center_coef: float = 0.0
    data_kind: str = "preference"
    lm_head: bool = False
    scalar_heads: tuple = (SCORE_HEAD,)
    needs_reference: bool = False

    def __post_init__(self):
        non_negative(binding("RewardModel.margin"), self.margin)
        non_negative(binding("RewardModel.center_coef"), self.center_coef)

    def loss(self, model, params, batch, ref_params, rng):
        both = concat_pairs(batch)
        B = batch["chosen_tokens"].shape[0]
        out = apply(model, params, both["tokens"], both["positions"], both["segment_ids"], **train_rngs(model, rng))
        r = gather_last(out[SCORE_HEAD], both["segment_ids"])
        rc, rr = r[:B], r[B:]
        losses = bradley_terry_losses(rc, rr, self.margin)
        if self.center_coef:
            losses = losses + self.center_coef * (rc + rr) ** 2
        metrics = {
            "accuracy": mean_metric((rc > rr).astype(jnp.float32)),
            "rewards/chosen": mean_metric(rc),
            "rewards/rejected": mean_metric(rr),
            "rewards/margins": mean_metric(rc - rr),
        }
        del ref_params
        weight = jnp.asarray(B, jnp.float32)
        return add_moe_aux_loss(model, out, losses.sum(), weight, metrics), weight, metrics
