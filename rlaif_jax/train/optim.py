"""Optimizers and learning-rate schedules (optax), built from gin."""

from __future__ import annotations

import functools
import re
from typing import Any, Callable, Optional, Sequence

import gin
import jax
import optax

from rlaif_jax.errors import ConfigError, binding, in_range, non_negative, one_of, positive

SCHEDULES = ("constant", "linear", "cosine")
OPTIMIZERS = ("adamw", "rmsprop", "sgd")


def make_schedule(
    learning_rate: float, schedule: str, warmup_steps: int, total_steps: Optional[int], end_lr_ratio: float = 0.0
) -> Callable:
    one_of(binding("make_optimizer.schedule"), schedule, SCHEDULES)
    if schedule != "constant" and not total_steps:
        raise ConfigError(
            f"{binding('make_optimizer.schedule')} = {schedule!r} needs the run's length: set "
            f"{binding('make_optimizer.total_steps')} (the trainer's num_steps is None)"
        )
    warm = optax.linear_schedule(0.0, learning_rate, warmup_steps) if warmup_steps else None
    decay_steps = max((total_steps or 0) - warmup_steps, 1)
    if schedule == "constant":
        main = optax.constant_schedule(learning_rate)
    elif schedule == "linear":
        main = optax.linear_schedule(learning_rate, learning_rate * end_lr_ratio, decay_steps)
    else:
        main = optax.cosine_decay_schedule(learning_rate, decay_steps, alpha=end_lr_ratio)
    return optax.join_schedules([warm, main], [warmup_steps]) if warm else main


def _path_str(path: tuple) -> str:
    return "/".join(str(p) for p in path)


def param_labels(params: Any, frozen: Sequence[str]) -> Any:
    """'frozen' for params whose path ("layers/attn/q_proj/kernel") matches any regex."""
    pats = [re.compile(p) for p in frozen]
    return jax.tree_util.tree_map_with_path(
        lambda path, _: "frozen" if any(p.search(_path_str(tuple(k.key for k in path))) for p in pats) else "train",
        params,
    )


def _frozen_labels(params: Any, frozen: tuple) -> Any:
    labels = param_labels(params, frozen)
    if "train" not in set(jax.tree.leaves(labels)):
        raise ConfigError(
            f"{binding('make_optimizer.frozen')} = {list(frozen)!r} freezes every parameter; leave some trainable"
        )
    return labels


def _decay_mask(params):
    # Weight decay on matrices only: norms' scales and biases are not regularised.
    return jax.tree.map(lambda x: x.ndim >= 2, params)


@gin.configurable
def make_optimizer(
    name: str = "adamw",
    learning_rate: float = 1e-5,
    schedule: str = "constant",
    warmup_steps: int = 0,
    total_steps: Optional[int] = None,
    end_lr_ratio: float = 0.0,
    weight_decay: float = 0.0,
    clip_norm: Optional[float] = 1.0,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    rmsprop_decay: float = 0.99,
    momentum: float = 0.0,
    frozen: Sequence[str] = (),
    params: Any = None,
    default_total_steps: Optional[int] = None,
) -> tuple[optax.GradientTransformation, Callable]:
    """(transformation, schedule). RMSprop defaults match torch.optim.RMSprop (the paper's
    optimizer): decay 0.99, eps 1e-8 added outside the square root. `frozen` regexes select
    params that never change (their updates are zero and they get no optimizer state)."""
    _check_settings(**locals())
    # The trainer passes its num_steps as default_total_steps; an explicit total_steps wins.
    sched = make_schedule(learning_rate, schedule, warmup_steps, total_steps or default_total_steps, end_lr_ratio)
    if name == "adamw":
        opt = optax.adamw(sched, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=_decay_mask)
    elif name == "rmsprop":
        opt = optax.rmsprop(sched, decay=rmsprop_decay, eps=eps, eps_in_sqrt=False, momentum=momentum or None)
        if weight_decay:
            opt = optax.chain(optax.add_decayed_weights(weight_decay, _decay_mask), opt)
    elif name == "sgd":
        opt = optax.sgd(sched, momentum=momentum or None)
        if weight_decay:
            opt = optax.chain(optax.add_decayed_weights(weight_decay, _decay_mask), opt)
    else:  # pragma: no cover - _check_settings refused it
        raise AssertionError(name)
    parts = [optax.clip_by_global_norm(clip_norm)] if clip_norm else []
    tx = optax.chain(*parts, opt)
    if frozen:
        # Labelled when the state is created, so the optimizer (and its settings' checks)
        # can be built before any weights are loaded; given params, checked right away.
        labels = functools.partial(_frozen_labels, frozen=tuple(frozen))
        if params is not None:
            labels(params)
        tx = optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)
    return tx, sched


def _check_settings(
    name,
    learning_rate,
    warmup_steps,
    total_steps,
    end_lr_ratio,
    weight_decay,
    clip_norm,
    b1,
    b2,
    eps,
    rmsprop_decay,
    momentum,
    **_,  # make_optimizer's other settings (schedule, frozen, params, ...) need no check here
) -> None:
    """A learning rate of 0 trains nothing and a negative one trains uphill, both silently."""
    b = lambda p: binding(f"make_optimizer.{p}")  # noqa: E731
    one_of(b("name"), name, OPTIMIZERS)
    positive(b("learning_rate"), learning_rate)
    non_negative(b("warmup_steps"), warmup_steps)
    positive(b("total_steps"), total_steps)
    in_range(b("end_lr_ratio"), end_lr_ratio, 0, 1)
    non_negative(b("weight_decay"), weight_decay)
    positive(b("clip_norm"), clip_norm, hint="> 0, or None for no clipping")
    in_range(b("b1"), b1, 0, 1, hi_open=True)
    in_range(b("b2"), b2, 0, 1, hi_open=True)
    positive(b("eps"), eps)
    in_range(b("rmsprop_decay"), rmsprop_decay, 0, 1, hi_open=True)
    in_range(b("momentum"), momentum, 0, 1, hi_open=True)
