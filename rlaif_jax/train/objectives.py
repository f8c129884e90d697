"""The objectives' shared contract.

An objective turns (model, params, batch) into a *sum* of per-example losses plus the
weight that normalises it (sequences, tokens or pairs) and metrics as (sum, count) pairs.
Keeping sums until the very end makes gradient accumulation over micro-batches and data
parallelism exactly equal to one large batch, whatever the per-micro-batch token counts.
"""

from __future__ import annotations

from typing import Any, Optional, Protocol

import jax
import jax.numpy as jnp

from rlaif_jax.train.logprobs import lm_forward, model_token_logps

Metrics = dict  # name -> (sum, count)


class Objective(Protocol):
    data_kind: str  # "sft", "preference" or "labelled" (KTO): which pipeline feeds it
    lm_head: bool
    scalar_heads: tuple
    needs_reference: bool  # whether a frozen reference param tree must be passed in

    def loss(self, model, params, batch: dict, ref_params: Optional[Any], rng: Optional[jax.Array]) -> tuple:
        """-> (loss_sum, weight, metrics). rng is None in evaluation."""
        ...


# Optional, for objectives that need a statistic of the whole step batch (KTO's KL reference
# point) and metrics derived from several means (train.step calls them when present):
#   batch_statistics(model, params, batch, ref_params) -> {name: (sum, count)}
#       summed over micro-batches and shards, then passed to loss() as batch[name] = sum / count
#   derived_metrics(means: dict) -> dict of extra logged scalars


def train_rngs(model, rng: Optional[jax.Array]) -> dict:
    """apply() keyword arguments for a training forward pass: the MoE router's jitter-noise
    stream when the model has router_jitter_noise (HF applies it only in training). Empty
    for dense models and in evaluation (rng None)."""
    cfg = model.cfg
    if rng is None or not (cfg.is_moe and cfg.router_jitter_noise):
        return {}
    return {"rngs": {"router": rng}}


def add_moe_aux_loss(model, out: dict, loss_sum, weight, metrics: Metrics):
    """With an MoE model's output_router_logits, adds router_aux_loss_coef * aux to the loss
    (as weight * that to the loss sum, so the normalised loss gains exactly coef * aux) and
    logs aux as `moe/aux_loss`; otherwise returns loss_sum unchanged."""
    if "moe_aux_loss" not in out:
        return loss_sum
    aux = out["moe_aux_loss"]
    metrics["moe/aux_loss"] = (aux, jnp.ones((), jnp.float32))
    return loss_sum + model.cfg.router_aux_loss_coef * aux * weight


def mean_metric(values: jax.Array, mask: Optional[jax.Array] = None) -> tuple:
    """(sum, count) of `values`, optionally only where mask."""
    values = values.astype(jnp.float32)
    if mask is None:
        return values.sum(), jnp.asarray(values.size, jnp.float32)
    mask = mask.astype(jnp.float32)
    return (values * mask).sum(), mask.sum()


def concat_pairs(batch: dict) -> dict:
    """chosen_* and rejected_* stacked into one batch of 2B rows (chosen first), so both go
    through a single forward pass."""
    out = {}
    for key in ("tokens", "positions", "segment_ids", "loss_mask"):
        out[key] = jnp.concatenate([batch[f"chosen_{key}"], batch[f"rejected_{key}"]], axis=0)
    return out


def response_logps(model, params, seqs: dict, rng: Optional[jax.Array] = None) -> tuple:
    """(forward output, [B] summed response log-probs, [B] response token counts >= 1) of one
    padded batch (tokens / positions / segment_ids / loss_mask), by vocabulary chunks when the
    model has them."""
    mask = seqs["loss_mask"].astype(jnp.float32)
    out = lm_forward(model, params, seqs["tokens"], seqs["positions"], seqs["segment_ids"], **train_rngs(model, rng))
    sums = (model_token_logps(model, params, out, seqs["tokens"]) * mask).sum(-1)
    return out, sums, jnp.maximum(mask.sum(-1), 1.0)


def chosen_nll(sums: jax.Array, n_tok: jax.Array, mask: jax.Array, convention: str) -> jax.Array:
    """The NLL (SFT) term of a pair objective as a sum over its B pairs (the step divides by B):
    "ours" each chosen response's per-token NLL, summed over pairs (exact under gradient
    accumulation); "trl" TRL's `nn.CrossEntropyLoss` over every chosen token of the (micro-)
    batch, times B. sums / n_tok / mask: the chosen rows' summed log-probs, token counts and
    [B, T] loss mask."""
    if convention == "trl":
        return -sums.sum() / jnp.maximum(mask.sum(), 1.0) * sums.shape[0]
    return -(sums / n_tok).sum()
