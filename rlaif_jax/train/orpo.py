"""ORPO (Hong et al. 2024): SFT and preference optimisation in one stage, no reference model.

With p = exp(mean log pi(y|x)) (log-probs averaged per response token, as the paper and TRL)
and odds(y) = p / (1 - p), per pair
  loss = NLL(y_w) - beta * log s(log odds(y_w) - log odds(y_l))
beta is the paper's lambda (TRL's ORPOConfig.beta, default 0.1). NLL(y_w): "ours" the chosen
response's per-token NLL, averaged over pairs (the paper's L_SFT, exact under gradient
accumulation); convention "trl": the cross-entropy over every chosen token of the batch, as
TRL's ORPOTrainer. Metrics carry TRL's names, including its `log_odds_ratio` (the mean of
log s(log odds ratio)) and `log_odds_chosen` (the mean log odds ratio).
"""

from __future__ import annotations

import dataclasses

import gin
import jax
import jax.numpy as jnp

from rlaif_jax.errors import binding, one_of, positive
from rlaif_jax.train.objectives import add_moe_aux_loss, chosen_nll, concat_pairs, mean_metric, response_logps

CONVENTIONS = ("ours", "trl")


def log1mexp(x):
    """log(1 - exp(x)) for x < 0, accurate at both ends (Maechler 2012). x is kept below
    -1e-7: a response whose every token has probability 1 in float32 would give -inf."""
    x = jnp.minimum(x, -1e-7)
    return jnp.where(x > -jnp.log(2.0), jnp.log(-jnp.expm1(x)), jnp.log1p(-jnp.exp(x)))


def log_odds_ratio(mean_chosen, mean_rejected):
    """[B] log odds(y_w) - log odds(y_l) from per-token mean log-probs."""
    return (mean_chosen - mean_rejected) - (log1mexp(mean_chosen) - log1mexp(mean_rejected))


@gin.configurable
@dataclasses.dataclass(frozen=True)
class ORPO:
    beta: float = 0.1  # the paper's lambda
    convention: str = "ours"
    data_kind: str = "preference"
    lm_head: bool = True
    scalar_heads: tuple = ()
    needs_reference: bool = False

    def __post_init__(self):
        positive(binding("ORPO.beta"), self.beta)
        one_of(binding("ORPO.convention"), self.convention, CONVENTIONS)

    def loss(self, model, params, batch, ref_params, rng):
        del ref_params
        both = concat_pairs(batch)
        B = batch["chosen_tokens"].shape[0]
        out, sums, n_tok = response_logps(model, params, both, rng)
        avg = sums / n_tok
        pc, pr = avg[:B], avg[B:]
        log_odds = log_odds_ratio(pc, pr)
        ratio = jax.nn.log_sigmoid(log_odds)
        nll = chosen_nll(sums[:B], n_tok[:B], both["loss_mask"][:B], self.convention)
        loss_sum = nll - self.beta * ratio.sum()
        chosen_r, rejected_r = self.beta * pc, self.beta * pr
        weight = jnp.asarray(B, jnp.float32)
        metrics = {
            "rewards/chosen": mean_metric(chosen_r),
            "rewards/rejected": mean_metric(rejected_r),
            "rewards/margins": mean_metric(chosen_r - rejected_r),
            "rewards/accuracies": mean_metric(chosen_r > rejected_r),
            "logps/chosen": mean_metric(pc),
            "logps/rejected": mean_metric(pr),
            "nll_loss": (nll, weight),
            "log_odds_ratio": mean_metric(ratio),
            "log_odds_chosen": mean_metric(log_odds),
        }
        return add_moe_aux_loss(model, out, loss_sum, weight, metrics), weight, metrics
