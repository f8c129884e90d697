"""Length-controlled win rate: the GLM of AlpacaEval 2 (Dubois et al. 2024), fit here with
Newton's method on a soft-label, L2-regularized logistic likelihood (numpy; 3 to a few
hundred parameters).

For a model m and instruction x with preference p_mx = P(m's output beats the reference),

    logit p_mx = theta_m + phi_m * tanh(delta_mx / sd(delta_m)) + psi_m * gamma_x

where delta is len(model output) - len(reference output) in characters, gamma_x the
instruction's difficulty. The LC win rate is the model's prediction with the length term at
zero, averaged over instructions: 100 * mean_x sigmoid(theta_m + psi_m * gamma_x).

Instruction difficulty. AlpacaEval estimates gamma_x once, jointly across the many models
of its leaderboard, and then treats it as a fixed covariate. We have one or a few runs, so:
  * several runs judged on the same instructions against the same reference
    (`estimate_instruction_difficulty`): gamma_x from one joint fit of
    logit p_mx = theta_m + phi_m * tanh(...) - gamma_x with a ridge penalty on gamma (a
    Gaussian prior: with a handful of runs each gamma_x rests on a handful of Bernoulli
    outcomes, and the penalty shrinks the noise toward zero), length term included so
    that difficulty does not absorb length;
  * a difficulty vector from elsewhere (e.g. AlpacaEval's published one), passed in;
  * a single run and nothing else: the term is dropped (gamma = 0) and LC is
    sigmoid(theta). The intercept then absorbs the average over instructions (a logistic
    fit with an intercept matches the mean outcome), but the omitted heterogeneity leaks
    into the length slope; in our simulations (tests/eval/test_length_control.py, 4 runs x
    805 instructions) this costs about 0.4 points of mean absolute error (1.8 vs 1.45).
Soft preferences (ties 0.5, logprob-weighted judges) are used as they are, like AlpacaEval's
`is_ytrue_proba=True`. Invalid judgments (NaN) are left out.

This is not alpaca_eval's computation, and the numbers differ (by several points on 805
instructions): alpaca_eval fits with an L1 penalty chosen by 5-fold cross-validation (which
can zero every coefficient and report exactly 50.0), scales the length difference over all
rows including invalid ones and averages over all instructions, where this module fits a
light L2 by Newton's method on the valid rows only. rlaif_jax.eval.alpaca_eval_lc
reproduces alpaca_eval's (evaluate's lc_method="alpaca_eval"). The standard error here is a
bootstrap over instructions (`lc_bootstrap_standard_error`); alpaca_eval's
`lc_standard_error` is the spread of its per-instruction predictions, another quantity.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np


def sigmoid(z):
    return np.exp(-np.logaddexp(0.0, -z))


def fit_logistic(
    X: np.ndarray,
    y: np.ndarray,
    l2: np.ndarray | float = 1e-2,
    weights: Optional[np.ndarray] = None,
    max_iter: int = 100,
    tol: float = 1e-10,
) -> np.ndarray:
    """argmin_b  -sum_i w_i [y_i log s(x_i b) + (1 - y_i) log s(-x_i b)] + l2/2 |b|^2 for soft
    labels y in [0, 1]: damped Newton with backtracking (the objective is strictly convex)."""
    X, y = np.asarray(X, np.float64), np.asarray(y, np.float64)
    n, d = X.shape
    w = np.ones(n) if weights is None else np.asarray(weights, np.float64)
    lam = np.broadcast_to(np.asarray(l2, np.float64), (d,))

    def obj(b):
        z = X @ b
        return float(np.sum(w * (y * np.logaddexp(0, -z) + (1 - y) * np.logaddexp(0, z))) + 0.5 * np.sum(lam * b * b))

    b = np.zeros(d)
    f = obj(b)
    for _ in range(max_iter):
        s = sigmoid(X @ b)
        g = X.T @ (w * (s - y)) + lam * b
        H = (X * (w * s * (1 - s))[:, None]).T @ X + np.diag(lam) + 1e-12 * np.eye(d)
        step = np.linalg.solve(H, g)
        t = 1.0
        while True:
            nb = b - t * step
            nf = obj(nb)
            if nf <= f + 1e-4 * t * -float(g @ step) or t < 1e-8:
                break
            t *= 0.5
        b, done = nb, abs(f - nf) <= tol * max(1.0, abs(f))
        f = nf
        if done:
            break
    return b


def length_feature(len_model: Sequence[float], len_ref: Sequence[float]) -> np.ndarray:
    """tanh of the length difference scaled by its standard deviation (not centred: zero must
    mean equal lengths)."""
    d = np.asarray(len_model, np.float64) - np.asarray(len_ref, np.float64)
    sd = np.std(d, ddof=1) if d.size > 1 else 0.0
    return np.tanh(d / sd) if sd > 0 else np.zeros_like(d)


def estimate_instruction_difficulty(
    preferences: np.ndarray, len_model: np.ndarray, len_ref: np.ndarray, l2_difficulty: float = 1.0, l2: float = 1e-2
) -> np.ndarray:
    """gamma_x from [runs, instructions] arrays (NaN preference = invalid / missing): one
    joint fit with per-run intercept and length slope and a shared, ridge-penalized
    per-instruction difficulty (higher = harder for the models than for the reference)."""
    P = np.asarray(preferences, np.float64)
    Lm, Lr = np.asarray(len_model, np.float64), np.broadcast_to(np.asarray(len_ref, np.float64), P.shape)
    if P.ndim != 2 or Lm.shape != P.shape:
        raise ValueError(f"need [runs, instructions] arrays of one shape, got {P.shape}, {Lm.shape}, {Lr.shape}")
    m, n = P.shape
    rows, ys = [], []
    for i in range(m):
        feat = length_feature(Lm[i], Lr[i])
        for x in np.flatnonzero(~np.isnan(P[i])):
            r = np.zeros(2 * m + n)
            r[2 * i], r[2 * i + 1], r[2 * m + x] = 1.0, feat[x], -1.0
            rows.append(r)
            ys.append(P[i, x])
    lam = np.concatenate([np.full(2 * m, l2), np.full(n, l2_difficulty)])
    beta = fit_logistic(np.stack(rows), np.asarray(ys), lam)
    return beta[2 * m :]


def length_controlled_win_rate(
    preferences: Sequence[float],
    len_model: Sequence[float],
    len_ref: Sequence[float],
    difficulty: Optional[Sequence[float]] = None,
    l2: float = 1e-2,
    n_bootstrap: int = 0,
    seed: int = 0,
) -> dict:
    """The LC win rate (percent) of one run; with n_bootstrap > 0 also its bootstrap standard
    error over instructions. Returns lc_win_rate, lc_bootstrap_standard_error (NaN without
    bootstrap; `lc_standard_error` is the same number under its old, ambiguous name), the
    coefficients (model, length, difficulty), and n (instructions used)."""
    p = np.asarray(preferences, np.float64)
    lm, lr = np.asarray(len_model, np.float64), np.asarray(len_ref, np.float64)
    if not (p.shape == lm.shape == lr.shape):
        raise ValueError(f"preferences, len_model and len_ref differ in shape: {p.shape}, {lm.shape}, {lr.shape}")
    gamma = None if difficulty is None else np.asarray(difficulty, np.float64)
    if gamma is not None and gamma.shape != p.shape:
        raise ValueError(f"difficulty has shape {gamma.shape}, preferences {p.shape}")
    ok = ~np.isnan(p)
    p, lm, lr = p[ok], lm[ok], lr[ok]
    gamma = None if gamma is None else gamma[ok]
    if p.size == 0:
        return {
            "lc_win_rate": math.nan,
            "lc_bootstrap_standard_error": math.nan,
            "lc_standard_error": math.nan,
            "coef": {},
            "n": 0,
        }

    def fit(idx):
        cols = [np.ones(idx.size), length_feature(lm[idx], lr[idx])]
        if gamma is not None:
            cols.append(gamma[idx])
        b = fit_logistic(np.stack(cols, 1), p[idx], l2)
        z = b[0] + (b[2] * gamma[idx] if gamma is not None else 0.0)
        return 100.0 * float(np.mean(sigmoid(np.broadcast_to(z, idx.shape)))), b

    lc, b = fit(np.arange(p.size))
    se = math.nan
    if n_bootstrap > 0 and p.size > 1:
        rng = np.random.default_rng(seed)
        se = float(np.std([fit(rng.integers(0, p.size, p.size))[0] for _ in range(n_bootstrap)], ddof=1))
    coef = {"model": float(b[0]), "length": float(b[1])}
    if gamma is not None:
        coef["difficulty"] = float(b[2])
    return {
        "lc_win_rate": lc,
        "lc_bootstrap_standard_error": se,
        "lc_standard_error": se,
        "coef": coef,
        "n": int(p.size),
    }
