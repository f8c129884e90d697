"""Supervised fine-tuning: cross-entropy on response tokens, padded or packed batches."""

from __future__ import annotations

import dataclasses

import gin
import jax.numpy as jnp

from rlaif_jax.errors import binding, one_of
from rlaif_jax.train.logprobs import chunked, entropy_and_accuracy, lm_forward, model_token_stats, token_logps
from rlaif_jax.train.objectives import add_moe_aux_loss, train_rngs


def num_sequences(positions, segment_ids):
    """Sequences in a (possibly packed) batch: each starts at position 0 of a real segment."""
    return ((positions == 0) & (segment_ids > 0)).sum().astype(jnp.float32)


@gin.configurable
@dataclasses.dataclass(frozen=True)
class SFT:
    """reduction="sum": each sequence's summed token NLL, averaged over sequences (the
    paper's code); "mean": NLL averaged over all response tokens in the batch."""

    reduction: str = "sum"
    data_kind: str = "sft"
    lm_head: bool = True
    scalar_heads: tuple = ()
    needs_reference: bool = False

    def __post_init__(self):
        one_of(binding("SFT.reduction"), self.reduction, ("sum", "mean"))

    def loss(self, model, params, batch, ref_params, rng):
        tokens, mask = batch["tokens"], batch["loss_mask"].astype(jnp.float32)
        out = lm_forward(model, params, tokens, batch["positions"], batch["segment_ids"], **train_rngs(model, rng))
        if chunked(model):
            stats = model_token_stats(model, params, out, tokens)
            nll = -(stats.logp * mask).sum()
            ent, correct = (stats.entropy * mask).sum(), (stats.correct * mask).sum()
        else:
            nll = -(token_logps(out["logits"], tokens) * mask).sum()
            ent, correct = entropy_and_accuracy(out["logits"], tokens, mask)
        n_tok = mask.sum()
        n_seq = num_sequences(batch["positions"], batch["segment_ids"])
        weight = n_seq if self.reduction == "sum" else n_tok
        metrics = {
            "nll_per_token": (nll, n_tok),
            "token_accuracy": (correct, n_tok),
            "entropy": (ent, n_tok),
            "response_tokens_per_sequence": (n_tok, n_seq),
        }
        del ref_params
        return add_moe_aux_loss(model, out, nll, weight, metrics), weight, metrics
