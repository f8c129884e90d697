"""KTO (Ethayarajh et al. 2024): a prospect-theoretic loss on unpaired completions, each
labelled desirable or undesirable, against a frozen reference.

With r = log pi(y|x) - log ref(y|x) (summed over response tokens) and z0 the KL reference
point,
  desirable    lambda_D * (1 - s(beta (r - z0)))
  undesirable  lambda_U * (1 - s(beta (z0 - r)))
averaged over the batch's examples (TRL's KTOTrainer, loss_type="kto"). loss_type
"apo_zero_unpaired" (TRL's unpaired APO-zero) drops z0: 1 - s(beta r) and s(beta r).

The KL estimate z0 (as the KTO paper and TRL): each row also carries a *mismatched* pair, its
prompt with the completion of the previous row of the same per-process batch (the rows cycled
by one, `kl_*` keys, built by the labelled pipeline); z0 = max(0, mean over those rows of
log pi(y'|x) - log ref(y'|x)), with no gradient. It is a statistic of the whole step batch:
`batch_statistics` returns its sum and count, train.step sums them over every micro-batch of a
gradient-accumulation step before any loss is taken, and the batch is one global array, so
the mean spans every data-parallel shard (TRL gathers it over processes too). The step's
gradient is therefore exactly that of one large batch, whatever grad_accum or the mesh. (TRL
takes z0 per micro-batch: under its gradient accumulation each micro-batch has its own z0.)
Called directly, without that statistic in the batch, `loss` estimates z0 from its own rows.
"""

from __future__ import annotations

import dataclasses

import gin
import jax
import jax.numpy as jnp

from rlaif_jax.errors import binding, non_negative, one_of, positive
from rlaif_jax.train.objectives import add_moe_aux_loss, mean_metric, response_logps

LOSS_TYPES = ("kto", "apo_zero_unpaired")
SEQUENCE_KEYS = ("tokens", "positions", "segment_ids", "loss_mask")
KL_KEY = "kto_kl"  # the batch entry train.step fills with the step batch's KL estimate


def kto_losses(logratios, desirable, kl, *, beta, loss_type="kto", desirable_weight=1.0, undesirable_weight=1.0):
    """Per-example weighted KTO losses from [B] policy-minus-reference log-ratios, a [B] bool
    `desirable` and the (already clamped) reference point kl."""
    if loss_type == "kto":
        good = 1 - jax.nn.sigmoid(beta * (logratios - kl))
        bad = 1 - jax.nn.sigmoid(beta * (kl - logratios))
    elif loss_type == "apo_zero_unpaired":
        good = 1 - jax.nn.sigmoid(beta * logratios)
        bad = jax.nn.sigmoid(beta * logratios)
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}; one of {LOSS_TYPES}")
    return jnp.where(desirable, desirable_weight * good, undesirable_weight * bad)


def real_rows(segment_ids) -> jax.Array:
    """[B] bool: the row holds an example (padding rows of a short last batch hold none)."""
    return segment_ids.max(-1) > 0


@gin.configurable
@dataclasses.dataclass(frozen=True)
class KTO:
    beta: float = 0.1
    # lambda_D / lambda_U; the KTO paper keeps lambda_D n_D / (lambda_U n_U) in [1, 4/3].
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0
    loss_type: str = "kto"
    data_kind: str = "labelled"
    lm_head: bool = True
    scalar_heads: tuple = ()
    needs_reference: bool = True

    def __post_init__(self):
        b = lambda p: binding(f"KTO.{p}")  # noqa: E731
        one_of(b("loss_type"), self.loss_type, LOSS_TYPES)
        positive(b("beta"), self.beta)
        non_negative(b("desirable_weight"), self.desirable_weight)
        non_negative(b("undesirable_weight"), self.undesirable_weight)

    def _kl_sums(self, model, params, batch, ref_params) -> tuple:
        """(sum, count) over the real rows of the mismatched pairs' log-ratios, no gradient."""
        kl_rows = {k: batch[f"kl_{k}"] for k in SEQUENCE_KEYS}
        _, pol, _ = response_logps(model, params, kl_rows)
        _, ref, _ = response_logps(model, ref_params, kl_rows)
        real = real_rows(kl_rows["segment_ids"]).astype(jnp.float32)
        return jax.lax.stop_gradient(((pol - ref) * real).sum()), real.sum()

    def batch_statistics(self, model, params, batch, ref_params) -> dict:
        if self.loss_type != "kto":
            return {}
        return {KL_KEY: self._kl_sums(model, params, batch, ref_params)}

    def derived_metrics(self, means: dict) -> dict:
        return {"rewards/margins": means["rewards/chosen"] - means["rewards/rejected"]}

    def loss(self, model, params, batch, ref_params, rng):
        seqs = {k: batch[k] for k in SEQUENCE_KEYS}
        out, pol, _ = response_logps(model, params, seqs, rng)
        _, ref, _ = response_logps(model, ref_params, seqs)
        ref = jax.lax.stop_gradient(ref)
        real = real_rows(seqs["segment_ids"])
        desirable = batch["label"] > 0.5
        if self.loss_type == "kto":
            if KL_KEY in batch:
                kl = batch[KL_KEY]
            else:
                s, c = self._kl_sums(model, params, batch, ref_params)
                kl = s / jnp.maximum(c, 1e-9)
            kl = jnp.maximum(jax.lax.stop_gradient(kl), 0.0)
        else:
            kl = jnp.zeros((), jnp.float32)
        logratios = pol - ref
        losses = kto_losses(
            logratios,
            desirable,
            kl,
            beta=self.beta,
            loss_type=self.loss_type,
            desirable_weight=self.desirable_weight,
            undesirable_weight=self.undesirable_weight,
        )
        losses = jnp.where(real, losses, 0.0)
        rewards = self.beta * logratios
        good, bad = real & desirable, real & ~desirable
        metrics = {
            "kl": (kl, jnp.ones((), jnp.float32)),
            "kto_loss": mean_metric(losses, real),
            "rewards/chosen": mean_metric(rewards, good),
            "rewards/rejected": mean_metric(rewards, bad),
            "logps/chosen": mean_metric(pol, good),
            "logps/rejected": mean_metric(pol, bad),
            "fraction_desirable": mean_metric(desirable, real),
        }
        weight = real.sum().astype(jnp.float32)
        return add_moe_aux_loss(model, out, losses.sum(), weight, metrics), weight, metrics
