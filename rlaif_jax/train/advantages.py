"""Pure functions for RL from a reward: KL estimators, GAE, whitening, KL controllers and
group baselines. All arrays are [batch, response_length] with a 0/1 mask of real tokens."""

from __future__ import annotations

import dataclasses

import gin
import jax
import jax.numpy as jnp

from rlaif_jax.errors import binding, non_negative, positive

KL_ESTIMATORS = ("k1", "k2", "k3")


def kl_estimate(logp: jax.Array, ref_logp: jax.Array, estimator: str = "k1") -> jax.Array:
    """Per-token estimate of KL(pi || ref) from samples of pi (Schulman's k1/k2/k3):
    k1 = log pi - log ref (unbiased, can be negative), k2 = (log pi - log ref)^2 / 2,
    k3 = exp(log ref - log pi) - 1 - (log ref - log pi) (unbiased, >= 0)."""
    d = logp - ref_logp
    if estimator == "k1":
        return d
    if estimator == "k2":
        return 0.5 * d**2
    if estimator == "k3":
        return jnp.expm1(-d) + d
    raise ValueError(f"KL estimator must be one of {KL_ESTIMATORS}, got {estimator!r}")


def gae(rewards, values, mask, gamma: float, lam: float):
    """Generalised advantage estimation by a reverse scan over time. Positions where mask
    is 0 (after a response ends) contribute nothing and bootstrap with value 0.
    Returns (advantages, returns = advantages + values)."""
    rewards, values, mask = (x.astype(jnp.float32) for x in (rewards, values, mask))
    next_values = jnp.concatenate([values[:, 1:] * mask[:, 1:], jnp.zeros_like(values[:, :1])], axis=1)
    deltas = (rewards + gamma * next_values - values) * mask

    def body(carry, xs):
        delta, m, next_m = xs
        adv = delta + gamma * lam * carry * next_m
        return adv * m, adv * m

    next_mask = jnp.concatenate([mask[:, 1:], jnp.zeros_like(mask[:, :1])], axis=1)
    _, adv = jax.lax.scan(body, jnp.zeros(rewards.shape[0]), (deltas.T, mask.T, next_mask.T), reverse=True)
    adv = adv.T
    return adv, (adv + values) * mask


def masked_mean(x, mask, axis=None):
    return (x * mask).sum(axis) / jnp.maximum(mask.sum(axis), 1.0)


def masked_var(x, mask, unbiased: bool = True):
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    if unbiased:
        n = mask.sum()
        var = var * n / jnp.maximum(n - 1, 1.0)
    return var


def whiten(x, mask, shift_mean: bool = True):
    """(x - mean) / std over masked entries; shift_mean=False keeps the mean (for rewards)."""
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    out = (x - mean) * jax.lax.rsqrt(var + 1e-8)
    if not shift_mean:
        out = out + mean
    return out * mask


@gin.configurable
@dataclasses.dataclass(frozen=True)
class KLController:
    """Fixed coefficient, or the adaptive controller of Ziegler et al. (2019): the
    coefficient moves by proportional error (KL - target) / target, clipped to +-0.2,
    scaled by n_steps / horizon."""

    init_coef: float = 0.05
    target: float | None = None
    horizon: int = 10000

    def __post_init__(self):
        non_negative(binding("KLController.init_coef"), self.init_coef)
        positive(binding("KLController.target"), self.target, hint="> 0, or None for a fixed coefficient")
        positive(binding("KLController.horizon"), self.horizon)

    def update(self, coef, kl, n_steps):
        if self.target is None:
            return coef
        error = jnp.clip(kl / self.target - 1.0, -0.2, 0.2)
        return coef * (1.0 + error * n_steps / self.horizon)


GROUP_STDS = ("population", "sample")


def group_advantages(scores, group_size: int, method: str, std: str = "population"):
    """Per-sequence advantages for K samples per prompt (rows grouped consecutively).
    rloo: score minus the mean of the other K-1 samples; grpo: (score - mean) / std, with
    std "population" (ddof 0, + 1e-6; ours) or "sample" (ddof 1, + 1e-4: TRL's GRPOTrainer)."""
    if std not in GROUP_STDS:
        raise ValueError(f"group std must be one of {GROUP_STDS}, got {std!r}")
    s = scores.reshape(-1, group_size)
    if method == "rloo":
        baseline = (s.sum(1, keepdims=True) - s) / (group_size - 1)
        adv = s - baseline
    elif method == "grpo":
        sd, eps = (s.std(1, keepdims=True), 1e-6) if std == "population" else (s.std(1, ddof=1, keepdims=True), 1e-4)
        adv = (s - s.mean(1, keepdims=True)) / (sd + eps)
    else:
        raise ValueError(f"group advantage method must be rloo or grpo, got {method!r}")
    return adv.reshape(-1)


def normalize_sequences(adv):
    """(a - mean) / (sample std + 1e-4) over per-sequence advantages: TRL's RLOOTrainer with
    normalize_advantages=True (sequence-weighted, where `whiten` weights by tokens)."""
    return (adv - adv.mean()) / (adv.std(ddof=1) + 1e-4)
