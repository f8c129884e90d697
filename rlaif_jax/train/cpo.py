"""CPO (Xu et al. 2024) and its reference-free relatives, as TRL's CPOTrainer:

  loss = l(pi(y_w), pi(y_l)) + cpo_alpha * NLL(y_w)

with l one of DPO's pair losses (train.dpo.preference_losses) on the policy's log-probs alone:
sigmoid, hinge, ipo, simpo (margin simpo_gamma; SimPO is CPO with simpo and cpo_alpha=0), and
alphapo (AlphaPO, Gupta et al. 2025: SimPO's loss on the rewards r = (1 - p^-alpha) / alpha
of the per-token mean probability p; as TRL, the behaviour-cloning term is off). ipo, simpo
and alphapo use per-token mean log-probs, sigmoid and hinge sums (TRL's choice). `alpha`
!= 0 applies the AlphaPO reward shape to any loss type, as TRL's CPOConfig.alpha.
NLL(y_w): "ours" per chosen response's token mean, averaged over pairs; "trl" the
cross-entropy over every chosen token of the batch (see objectives.chosen_nll).
"""

from __future__ import annotations

import dataclasses

import gin
import jax.numpy as jnp

from rlaif_jax.errors import ConfigError, binding, in_range, non_negative, one_of, positive
from rlaif_jax.train.dpo import preference_losses
from rlaif_jax.train.objectives import add_moe_aux_loss, chosen_nll, concat_pairs, mean_metric, response_logps

LOSS_TYPES = ("sigmoid", "hinge", "ipo", "simpo", "alphapo")
AVERAGED = ("ipo", "simpo", "alphapo")
CONVENTIONS = ("ours", "trl")


def alphapo_rewards(logps, alpha: float):
    """(1 - p^-alpha) / alpha for p = exp(logps); logps itself as alpha -> 0."""
    return -jnp.expm1(-alpha * logps) / alpha


@gin.configurable
@dataclasses.dataclass(frozen=True)
class CPO:
    loss_type: str = "sigmoid"
    beta: float = 0.1
    label_smoothing: float = 0.0
    simpo_gamma: float = 0.5
    cpo_alpha: float = 1.0  # weight of the NLL (behaviour-cloning) term; ignored by alphapo
    alpha: float = 0.0  # AlphaPO's reward shape; required != 0 by loss_type "alphapo"
    convention: str = "ours"
    data_kind: str = "preference"
    lm_head: bool = True
    scalar_heads: tuple = ()
    needs_reference: bool = False

    def __post_init__(self):
        b = lambda p: binding(f"CPO.{p}")  # noqa: E731
        one_of(b("loss_type"), self.loss_type, LOSS_TYPES)
        one_of(b("convention"), self.convention, CONVENTIONS)
        positive(b("beta"), self.beta)
        in_range(b("label_smoothing"), self.label_smoothing, 0, 0.5, hi_open=True)
        non_negative(b("cpo_alpha"), self.cpo_alpha)
        non_negative(b("simpo_gamma"), self.simpo_gamma)
        if self.loss_type == "alphapo" and self.alpha == 0:
            raise ConfigError(
                f"{b('loss_type')} = 'alphapo' with {b('alpha')} = 0 is plain SimPO; bind {b('alpha')} "
                "(e.g. 0.25; the AlphaPO paper's range is about -1..1) or use loss_type 'simpo'"
            )

    def loss(self, model, params, batch, ref_params, rng):
        del ref_params
        both = concat_pairs(batch)
        B = batch["chosen_tokens"].shape[0]
        out, sums, n_tok = response_logps(model, params, both, rng)
        logps = sums / n_tok if self.loss_type in AVERAGED else sums
        pc, pr = logps[:B], logps[B:]
        rc, rr = (alphapo_rewards(pc, self.alpha), alphapo_rewards(pr, self.alpha)) if self.alpha else (pc, pr)
        zero = jnp.zeros_like(pc)
        losses, chosen_r, rejected_r = preference_losses(
            rc,
            rr,
            zero,
            zero,
            loss_type="simpo" if self.loss_type == "alphapo" else self.loss_type,
            beta=self.beta,
            label_smoothing=self.label_smoothing,
            simpo_gamma=self.simpo_gamma,
        )
        nll = chosen_nll(sums[:B], n_tok[:B], both["loss_mask"][:B], self.convention)
        bc = 0.0 if self.loss_type == "alphapo" else self.cpo_alpha
        loss_sum = losses.sum() + bc * nll
        weight = jnp.asarray(B, jnp.float32)
        metrics = {
            "preference_loss": mean_metric(losses),
            "rewards/chosen": mean_metric(chosen_r),
            "rewards/rejected": mean_metric(rejected_r),
            "rewards/margins": mean_metric(chosen_r - rejected_r),
            "rewards/accuracies": mean_metric(chosen_r > rejected_r),
            "logps/chosen": mean_metric(pc),
            "logps/rejected": mean_metric(pr),
            "nll_loss": (nll, weight),
        }
        return add_moe_aux_loss(model, out, loss_sum, weight, metrics), weight, metrics
