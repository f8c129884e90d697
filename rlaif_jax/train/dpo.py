"""The DPO family on summed (or length-normalised) response log-probs.

Losses, with h = (log pi(y_w) - log pi(y_l)) - (log ref(y_w) - log ref(y_l)):
  sigmoid  -(1-e) log s(beta h) - e log s(-beta h)       DPO; e > 0 is conservative DPO
  robust   [-(1-e) log s(beta h) + e log s(-beta h)] / (1-2e)   unbiased under label flips
  ipo      (h - 1/(2 beta))^2
  hinge    max(0, 1 - beta h)                             SLiC
  simpo    -(1-e) log s(beta d - gamma) - e log s(-(beta d - gamma)),
           d = mean log pi(y_w) - mean log pi(y_l), no reference
plus rpo_alpha * (per-token NLL of y_w) for the RPO / SFT-regularised variant.
"""

from __future__ import annotations

import dataclasses

import gin
import jax
import jax.numpy as jnp

from rlaif_jax.models.params import apply
from rlaif_jax.train.logprobs import token_logps
from rlaif_jax.train.objectives import add_moe_aux_loss, concat_pairs, mean_metric, train_rngs

LOSS_TYPES = ("sigmoid", "robust", "ipo", "hinge", "simpo")
REFERENCES = ("model", "precomputed", "none")


def preference_losses(pc, pr, rc, rr, *, loss_type, beta, label_smoothing=0.0, simpo_gamma=0.0):
    """Per-pair losses and implicit rewards from sequence log-probs (policy chosen/rejected,
    reference chosen/rejected; the reference is ignored by simpo)."""
    e = label_smoothing
    if loss_type == "simpo":
        z = beta * (pc - pr) - simpo_gamma
        losses = -(1 - e) * jax.nn.log_sigmoid(z) - e * jax.nn.log_sigmoid(-z)
        return losses, beta * pc, beta * pr
    h = (pc - pr) - (rc - rr)
    if loss_type == "sigmoid":
        losses = -(1 - e) * jax.nn.log_sigmoid(beta * h) - e * jax.nn.log_sigmoid(-beta * h)
    elif loss_type == "robust":
        losses = (-(1 - e) * jax.nn.log_sigmoid(beta * h) + e * jax.nn.log_sigmoid(-beta * h)) / (1 - 2 * e)
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    elif loss_type == "hinge":
        losses = jax.nn.relu(1 - beta * h)
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}; one of {LOSS_TYPES}")
    return losses, beta * (pc - rc), beta * (pr - rr)


@gin.configurable
@dataclasses.dataclass(frozen=True)
class DPO:
    loss_type: str = "sigmoid"
    beta: float = 0.1
    label_smoothing: float = 0.0
    # Length-normalised log-probs (simpo always uses them).
    average_log_prob: bool = False
    # "model": a frozen reference param tree passed to every step; "precomputed": the
    # batch carries ref_chosen_logps / ref_rejected_logps (summed); "none": reference-free.
    reference: str = "model"
    simpo_gamma: float = 0.0
    rpo_alpha: float = 0.0
    data_kind: str = "preference"
    lm_head: bool = True
    scalar_heads: tuple = ()

    def __post_init__(self):
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"DPO.loss_type {self.loss_type!r} is not one of {LOSS_TYPES}")
        if self.reference not in REFERENCES:
            raise ValueError(f"DPO.reference {self.reference!r} is not one of {REFERENCES}")
        if not 0 <= self.label_smoothing < 0.5:
            raise ValueError(f"DPO.label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if self.beta <= 0:
            raise ValueError(f"DPO.beta must be > 0, got {self.beta}")

    @property
    def needs_reference(self) -> bool:
        return self.reference == "model" and self.loss_type != "simpo"

    def loss(self, model, params, batch, ref_params, rng, mesh):
        both = concat_pairs(batch)
        B = batch["chosen_tokens"].shape[0]
        mask = both["loss_mask"].astype(jnp.float32)
        n_tok = jnp.maximum(mask.sum(-1), 1.0)
        out = apply(model, params, both["tokens"], both["positions"], both["segment_ids"], mesh=mesh,
                    **train_rngs(model, rng))
        tok_lp = token_logps(out["logits"], both["tokens"]) * mask
        sums = tok_lp.sum(-1)
        average = self.average_log_prob or self.loss_type == "simpo"
        logps = sums / n_tok if average else sums
        pc, pr = logps[:B], logps[B:]

        if self.loss_type == "simpo" or self.reference == "none":
            rc = rr = jnp.zeros_like(pc)
        elif self.reference == "precomputed":
            ref = jnp.stack([batch["ref_chosen_logps"], batch["ref_rejected_logps"]]).reshape(-1)
            ref = ref / n_tok if average else ref
            rc, rr = ref[:B], ref[B:]
        else:
            ref_out = apply(model, ref_params, both["tokens"], both["positions"], both["segment_ids"], mesh=mesh)
            ref_sums = (token_logps(ref_out["logits"], both["tokens"]) * mask).sum(-1)
            ref_lp = jax.lax.stop_gradient(ref_sums / n_tok if average else ref_sums)
            rc, rr = ref_lp[:B], ref_lp[B:]

        losses, chosen_r, rejected_r = preference_losses(
            pc, pr, rc, rr, loss_type=self.loss_type, beta=self.beta,
            label_smoothing=self.label_smoothing, simpo_gamma=self.simpo_gamma,
        )
        loss_sum = losses.sum()
        chosen_nll = -(sums[:B] / n_tok[:B])
        if self.rpo_alpha:
            loss_sum = loss_sum + self.rpo_alpha * chosen_nll.sum()
        metrics = {
            "preference_loss": mean_metric(losses),
            "rewards/chosen": mean_metric(chosen_r),
            "rewards/rejected": mean_metric(rejected_r),
            "rewards/margins": mean_metric(chosen_r - rejected_r),
            "rewards/accuracies": mean_metric((chosen_r > rejected_r).astype(jnp.float32)),
            "logps/chosen": mean_metric(sums[:B]),
            "logps/rejected": mean_metric(sums[B:]),
            "nll/chosen_per_token": mean_metric(chosen_nll),
        }
        weight = jnp.asarray(B, jnp.float32)
        return add_moe_aux_loss(model, out, loss_sum, weight, metrics), weight, metrics
