"""The DPO family on summed (or length-normalised) response log-probs.

Losses, with h = (log pi(y_w) - log pi(y_l)) - (log ref(y_w) - log ref(y_l)):
  sigmoid  -(1-e) log s(beta h) - e log s(-beta h)       DPO; e > 0 is conservative DPO
  robust   [-(1-e) log s(beta h) + e log s(-beta h)] / (1-2e)   unbiased under label flips
  ipo      (h - 1/(2 beta))^2
  hinge    max(0, 1 - beta h)                             SLiC
  simpo    -(1-e) log s(beta d - gamma) - e log s(-(beta d - gamma)),
           d = mean log pi(y_w) - mean log pi(y_l), no reference
plus rpo_alpha * (per-token NLL of y_w) for the RPO / SFT-regularised variant.

convention="trl" gives TRL's numbers where its same-named objective or metric differs
(DPOTrainer of trl 1.16; SimPO is its CPOTrainer): IPO on the per-token average of each
response's log-ratio (TRL's normalisation, confirmed with the IPO authors; ours uses sums
unless average_log_prob); the RPO term as TRL's "sft" loss, the NLL averaged over every
chosen token of the batch (ours: per sequence, then over sequences); `rewards/*` always
beta * summed log-ratios (ours follow average_log_prob); SimPO's `logps/*` the per-token
averages its loss uses (ours: sums). See docs/conventions.md.
"""

from __future__ import annotations

import dataclasses

import gin
import jax
import jax.numpy as jnp

from rlaif_jax.errors import binding, in_range, non_negative, one_of, positive
from rlaif_jax.train.logprobs import lm_forward, model_token_logps
from rlaif_jax.train.objectives import add_moe_aux_loss, concat_pairs, mean_metric, train_rngs

LOSS_TYPES = ("sigmoid", "robust", "ipo", "hinge", "simpo")
REFERENCES = ("model", "precomputed", "none")
CONVENTIONS = ("ours", "trl")


def preference_losses(pc, pr, rc, rr, *, loss_type, beta, label_smoothing=0.0, simpo_gamma=0.0, ipo_lengths=None):
    """Per-pair losses and implicit rewards from sequence log-probs (policy chosen/rejected,
    reference chosen/rejected; the reference is ignored by simpo). ipo_lengths=(n_chosen,
    n_rejected) token counts: IPO on each response's log-ratio divided by its length
    (TRL's IPO), from summed log-probs."""
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
        if ipo_lengths is not None:
            h = (pc - rc) / ipo_lengths[0] - (pr - rr) / ipo_lengths[1]
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
    # "ours" or "trl" (TRL's normalisations of IPO and RPO and its metric scales; see above)
    convention: str = "ours"

    def __post_init__(self):
        b = lambda p: binding(f"DPO.{p}")  # noqa: E731
        one_of(b("convention"), self.convention, CONVENTIONS)
        one_of(b("loss_type"), self.loss_type, LOSS_TYPES)
        one_of(b("reference"), self.reference, REFERENCES)
        positive(b("beta"), self.beta)
        in_range(b("label_smoothing"), self.label_smoothing, 0, 0.5, hi_open=True)
        non_negative(b("rpo_alpha"), self.rpo_alpha)
        non_negative(b("simpo_gamma"), self.simpo_gamma)

    @property
    def needs_reference(self) -> bool:
        return self.reference == "model" and self.loss_type != "simpo"

    def loss(self, model, params, batch, ref_params, rng):
        both = concat_pairs(batch)
        B = batch["chosen_tokens"].shape[0]
        mask = both["loss_mask"].astype(jnp.float32)
        n_tok = jnp.maximum(mask.sum(-1), 1.0)
        out = lm_forward(
            model, params, both["tokens"], both["positions"], both["segment_ids"], **train_rngs(model, rng)
        )
        tok_lp = model_token_logps(model, params, out, both["tokens"]) * mask
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
            ref_out = lm_forward(model, ref_params, both["tokens"], both["positions"], both["segment_ids"])
            ref_sums = (model_token_logps(model, ref_params, ref_out, both["tokens"]) * mask).sum(-1)
            ref_lp = jax.lax.stop_gradient(ref_sums / n_tok if average else ref_sums)
            rc, rr = ref_lp[:B], ref_lp[B:]

        trl = self.convention == "trl"
        # TRL's IPO divides summed log-ratios by length; already-averaged log-probs need nothing more
        ipo_lengths = (n_tok[:B], n_tok[B:]) if trl and self.loss_type == "ipo" and not average else None
        losses, chosen_r, rejected_r = preference_losses(
            pc,
            pr,
            rc,
            rr,
            loss_type=self.loss_type,
            beta=self.beta,
            label_smoothing=self.label_smoothing,
            simpo_gamma=self.simpo_gamma,
            ipo_lengths=ipo_lengths,
        )
        if trl and self.loss_type != "simpo" and average:
            # TRL logs rewards/* on summed log-ratios whatever the loss normalises
            chosen_r, rejected_r = self.beta * (pc - rc) * n_tok[:B], self.beta * (pr - rr) * n_tok[B:]
        loss_sum = losses.sum()
        chosen_nll = -(sums[:B] / n_tok[:B])
        if self.rpo_alpha:
            if trl:  # TRL's "sft" loss: the mean NLL over all chosen tokens of the batch, per pair
                rpo = -sums[:B].sum() / jnp.maximum(mask[:B].sum(), 1.0) * B
            else:
                rpo = chosen_nll.sum()
            loss_sum = loss_sum + self.rpo_alpha * rpo
        logged = logps if trl and self.loss_type == "simpo" else sums  # CPOTrainer logs SimPO's averages
        metrics = {
            "preference_loss": mean_metric(losses),
            "rewards/chosen": mean_metric(chosen_r),
            "rewards/rejected": mean_metric(rejected_r),
            "rewards/margins": mean_metric(chosen_r - rejected_r),
            "rewards/accuracies": mean_metric((chosen_r > rejected_r).astype(jnp.float32)),
            "logps/chosen": mean_metric(logged[:B]),
            "logps/rejected": mean_metric(logged[B:]),
            "nll/chosen_per_token": mean_metric(chosen_nll),
        }
        weight = jnp.asarray(B, jnp.float32)
        return add_moe_aux_loss(model, out, loss_sum, weight, metrics), weight, metrics
