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

Metrics = dict  # name -> (sum, count)


class Objective(Protocol):
    data_kind: str  # "sft" or "preference": which pipeline feeds it
    lm_head: bool
    scalar_heads: tuple
    needs_reference: bool  # whether a frozen reference param tree must be passed in

    def loss(self, model, params, batch: dict, ref_params: Optional[Any], rng: Optional[jax.Array], mesh) -> tuple:
        """-> (loss_sum, weight, metrics). rng is None in evaluation."""
        ...


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
