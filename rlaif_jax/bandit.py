"""The paper's bandit: why RLAIF on a weak student loses to SFT on a strong teacher.

Actions 0..K-1 with true reward r(a) = a. Teacher and student are discretized Gaussians,
pi(a) ∝ exp(-(a - mean)^2 / width). A tabular Bradley-Terry reward is fit to pairs of
*student* samples labelled by the true reward; the RLAIF policy is the KL-regularized
optimum over the student, pi ∝ pi_student * exp(r_hat / beta). The SFT policy is a tabular
softmax fit by maximum likelihood to teacher samples. RLAIF can only reweight actions the
student samples (the BT reward barely moves where there are no pairs), so with a strong
enough teacher SFT wins.

Both fits are plain (S)GD with a mean loss, compiled with jax.jit + lax.scan. batch_size 0
means full-batch gradients, computed exactly and cheaply from sufficient statistics (a
KxK win-count matrix for BT, action counts for SFT) instead of per-sample losses.
"""

from __future__ import annotations

import dataclasses
import time
from functools import partial
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class BanditConfig:
    num_actions: int = 100
    teacher_mean: float = 80.0
    teacher_width: float = 300.0
    student_mean: float = 40.0
    student_width: float = 300.0
    num_pairs: int = 250_000
    num_teacher_samples: int = 250_000
    reward_lr: float = 0.01
    reward_steps: int = 7_500
    sft_lr: float = 0.01
    sft_steps: int = 15_000
    beta: float = 0.1
    batch_size: int = 0  # 0: full batch
    seed: int = 0


def gaussian_policy(num_actions: int, mean: float, width: float) -> jnp.ndarray:
    a = jnp.arange(num_actions, dtype=jnp.float32)
    return jax.nn.softmax(-((a - mean) ** 2) / width)


def true_reward(num_actions: int) -> jnp.ndarray:
    return jnp.arange(num_actions, dtype=jnp.float32)


def kl_optimal_policy(base: jnp.ndarray, reward: jnp.ndarray, beta: float) -> jnp.ndarray:
    """argmax_pi E_pi[r] - beta * KL(pi || base) = base * exp(r / beta) / Z (in log space,
    since r / beta reaches ~1000 here)."""
    return jax.nn.softmax(jnp.log(base) + reward / beta)


def expected_reward(pi: jnp.ndarray, reward: jnp.ndarray) -> float:
    return float(jnp.sum(pi * reward))


def sample_pairs(key, probs: jnp.ndarray, n: int, reward: jnp.ndarray):
    """(a, b, y): n pairs of independent samples and y = P(a preferred) under the noiseless
    true reward (0.5 when a == b, which the BT likelihood treats as half a win each)."""
    ka, kb = jax.random.split(key)
    logits = jnp.log(probs)
    a = jax.random.categorical(ka, logits, shape=(n,))
    b = jax.random.categorical(kb, logits, shape=(n,))
    y = jnp.where(reward[a] > reward[b], 1.0, jnp.where(reward[a] < reward[b], 0.0, 0.5))
    return a, b, y


def win_counts(a, b, y, num_actions: int) -> jnp.ndarray:
    """W[i, j] = (fractional) number of times i was preferred over j."""
    w = jnp.zeros((num_actions, num_actions), jnp.float32)
    return w.at[a, b].add(y).at[b, a].add(1.0 - y)


def bt_loss_counts(r: jnp.ndarray, wins: jnp.ndarray, n: float) -> jnp.ndarray:
    """Mean BT negative log-likelihood over the n pairs summarized in `wins`."""
    margin = r[:, None] - r[None, :]
    return jnp.sum(wins * jax.nn.softplus(-margin)) / n


def bt_loss_pairs(r, a, b, y):
    m = r[a] - r[b]
    return jnp.mean(y * jax.nn.softplus(-m) + (1.0 - y) * jax.nn.softplus(m))


@partial(jax.jit, static_argnames=("steps", "batch_size", "num_actions"))
def fit_bradley_terry(a, b, y, key, *, num_actions: int, lr: float, steps: int, batch_size: int = 0):
    """Tabular BT reward (init 0) by SGD on the mean pair loss. Identified only up to a
    constant, which the KL-optimal policy ignores."""
    r0 = jnp.zeros((num_actions,), jnp.float32)
    if batch_size == 0:
        wins, n = win_counts(a, b, y, num_actions), a.shape[0]
        grad = jax.grad(bt_loss_counts)

        def step(r, _):
            return r - lr * grad(r, wins, n), None

        r, _ = jax.lax.scan(step, r0, None, length=steps)
        return r
    grad = jax.grad(bt_loss_pairs)

    def mstep(r, k):
        idx = jax.random.randint(k, (batch_size,), 0, a.shape[0])
        return r - lr * grad(r, a[idx], b[idx], y[idx]), None

    r, _ = jax.lax.scan(mstep, r0, jax.random.split(key, steps))
    return r


def sft_loss_counts(logits, counts, n):
    return -jnp.sum(counts * jax.nn.log_softmax(logits)) / n


def sft_loss_samples(logits, x):
    return -jnp.mean(jax.nn.log_softmax(logits)[x])


@partial(jax.jit, static_argnames=("steps", "batch_size", "num_actions"))
def fit_sft(samples, key, *, num_actions: int, lr: float, steps: int, batch_size: int = 0) -> jnp.ndarray:
    """Tabular softmax policy (logits init 0, i.e. uniform) by SGD on the mean NLL of the
    samples; returns its probabilities."""
    th0 = jnp.zeros((num_actions,), jnp.float32)
    if batch_size == 0:
        counts, n = jnp.zeros((num_actions,), jnp.float32).at[samples].add(1.0), samples.shape[0]
        grad = jax.grad(sft_loss_counts)

        def step(th, _):
            return th - lr * grad(th, counts, n), None

        th, _ = jax.lax.scan(step, th0, None, length=steps)
    else:
        grad = jax.grad(sft_loss_samples)

        def mstep(th, k):
            idx = jax.random.randint(k, (batch_size,), 0, samples.shape[0])
            return th - lr * grad(th, samples[idx]), None

        th, _ = jax.lax.scan(mstep, th0, jax.random.split(key, steps))
    return jax.nn.softmax(th)


def run(cfg: BanditConfig) -> dict:
    """Everything the experiment produces: the four policies, the fitted reward, their
    expected true rewards, and timings."""
    t0 = time.perf_counter()
    k = cfg.num_actions
    r = true_reward(k)
    teacher = gaussian_policy(k, cfg.teacher_mean, cfg.teacher_width)
    student = gaussian_policy(k, cfg.student_mean, cfg.student_width)
    k_pairs, k_teacher, k_bt, k_sft = jax.random.split(jax.random.key(cfg.seed), 4)
    a, b, y = sample_pairs(k_pairs, student, cfg.num_pairs, r)
    r_hat = fit_bradley_terry(
        a, b, y, k_bt, num_actions=k, lr=cfg.reward_lr, steps=cfg.reward_steps, batch_size=cfg.batch_size
    )
    rlaif = kl_optimal_policy(student, r_hat, cfg.beta)
    x = jax.random.categorical(k_teacher, jnp.log(teacher), shape=(cfg.num_teacher_samples,))
    sft = fit_sft(x, k_sft, num_actions=k, lr=cfg.sft_lr, steps=cfg.sft_steps, batch_size=cfg.batch_size)
    sft.block_until_ready()
    policies = {"student": student, "rlaif": rlaif, "sft": sft, "teacher": teacher}
    return {
        "config": dataclasses.asdict(cfg),
        "expected_reward": {name: expected_reward(p, r) for name, p in policies.items()},
        "policies": {name: np.asarray(p) for name, p in policies.items()},
        "reward_hat": np.asarray(r_hat),
        "pair_counts": np.asarray(jnp.zeros((k,)).at[a].add(1.0).at[b].add(1.0)),
        "seconds": time.perf_counter() - t0,
    }


def plot(result: dict, path: str, title: Optional[str] = None) -> None:
    """Left: the four policies over actions. Right: the fitted BT reward and how often the
    student sampled each action."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pols, er = result["policies"], result["expected_reward"]
    k = len(pols["student"])
    acts = np.arange(k)
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    styles = {
        "student": ("tab:gray", "--"),
        "teacher": ("tab:green", "--"),
        "rlaif": ("tab:red", "-"),
        "sft": ("tab:blue", "-"),
    }
    labels = {"student": "student", "teacher": "teacher", "rlaif": "RLAIF (BT + KL-opt.)", "sft": "SFT on teacher"}
    for name in ("student", "teacher", "rlaif", "sft"):
        c, ls = styles[name]
        ax.plot(acts, pols[name], color=c, ls=ls, label=f"{labels[name]}: E[r]={er[name]:.1f}")
    ax.set_xlabel("action (true reward = index)")
    ax.set_ylabel("probability")
    ax.legend(fontsize=8)
    ax.set_title(title or "policies")
    # The noiseless BT MLE diverges, so after a finite number of SGD steps only the shape of
    # the fitted reward means anything; it is shown on its own axis.
    ax2.plot(acts, result["reward_hat"], color="tab:red", label="fitted BT reward")
    ax2b = ax2.twinx()
    ax2b.bar(acts, result["pair_counts"], color="tab:gray", alpha=0.25)
    ax2b.set_ylabel("times sampled in student pairs (bars)")
    ax2.set_xlabel("action (true reward = index)")
    ax2.set_ylabel("fitted reward")
    ax2.legend(fontsize=8, loc="upper left")
    ax2.set_title("the reward is learned only where the student samples")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
