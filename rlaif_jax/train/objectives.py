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

    def loss(self, model, params, batch: dict, ref_params: Optional[Any], rng: jax.Array, mesh) -> tuple:
        """-> (loss_sum, weight, metrics)"""
        ...


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
