"""The bandit experiment's pieces against closed forms and direct optimization."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from rlaif_jax import bandit as B


def _objective(pi, r, base, beta):
    return jnp.sum(pi * r) - beta * jnp.sum(pi * (jnp.log(pi) - jnp.log(base)))


def test_kl_optimal_policy_maximizes_regularized_reward():
    k, beta = 12, 0.7
    kr, kb = jax.random.split(jax.random.key(3))
    r = jax.random.normal(kr, (k,)) * 2.0
    base = jax.nn.softmax(jax.random.normal(kb, (k,)))
    closed = B.kl_optimal_policy(base, r, beta)
    # Its value is beta * log Z (Z the normalizer of base * exp(r / beta)).
    log_z = jax.scipy.special.logsumexp(jnp.log(base) + r / beta)
    np.testing.assert_allclose(_objective(closed, r, base, beta), beta * log_z, rtol=1e-5)

    # Direct numerical maximization (scipy L-BFGS over softmax logits, float64 numpy).
    from scipy.optimize import minimize
    from scipy.special import log_softmax

    r64, lb64 = np.asarray(r, np.float64), np.log(np.asarray(base, np.float64))

    def neg(th):
        lp = log_softmax(th)
        p = np.exp(lp)
        return -(p @ r64 - beta * p @ (lp - lb64))

    sol = minimize(neg, np.zeros(k), method="L-BFGS-B", options={"gtol": 1e-10, "ftol": 1e-14, "maxiter": 5000})
    numeric = np.exp(log_softmax(sol.x))
    np.testing.assert_allclose(numeric, closed, atol=2e-4)
    np.testing.assert_allclose(-sol.fun, beta * log_z, rtol=1e-5)
    g = jax.grad(lambda th: -_objective(jax.nn.softmax(th), r, base, beta))
    # Stationary: the gradient of the objective at the closed form vanishes.
    assert float(jnp.max(jnp.abs(g(jnp.log(closed))))) < 1e-5
    # And any perturbation of it is worse.
    for i in range(5):
        noise = jax.random.normal(jax.random.key(10 + i), (k,)) * 0.1
        assert _objective(jax.nn.softmax(jnp.log(closed) + noise), r, base, beta) < _objective(closed, r, base, beta)


def test_bradley_terry_recovers_reward_differences():
    k = 10
    true = 0.3 * jnp.arange(k, dtype=jnp.float32)
    key = jax.random.key(0)
    a, b, _ = B.sample_pairs(key, jnp.full((k,), 1.0 / k), 50_000, true)
    y = jax.nn.sigmoid(true[a] - true[b])  # BT's own label probabilities: the MLE is the truth
    r_hat = B.fit_bradley_terry(a, b, y, key, num_actions=k, lr=2.0, steps=3000)
    np.testing.assert_allclose(r_hat - r_hat[0], true - true[0], atol=0.03)
    # The minibatch path agrees (up to SGD noise).
    r_mb = B.fit_bradley_terry(a, b, y, key, num_actions=k, lr=0.5, steps=4000, batch_size=512)
    np.testing.assert_allclose(r_mb - r_mb[0], true - true[0], atol=0.25)


def test_bradley_terry_learns_only_where_the_student_samples():
    cfg = B.BanditConfig(num_pairs=20_000, reward_steps=1500, reward_lr=0.1)
    r = B.true_reward(cfg.num_actions)
    student = B.gaussian_policy(cfg.num_actions, cfg.student_mean, cfg.student_width)
    a, b, y = B.sample_pairs(jax.random.key(1), student, cfg.num_pairs, r)
    r_hat = np.asarray(B.fit_bradley_terry(a, b, y, jax.random.key(2), num_actions=100, lr=0.1, steps=1500))
    # Increasing where the student has mass (sampling noise allows small local wiggles).
    assert np.corrcoef(r_hat[30:51], np.arange(30, 51))[0, 1] > 0.95
    assert r_hat[50] - r_hat[30] > 1.0
    assert abs(r_hat[99] - r_hat[95]) < 1e-3  # never sampled: nothing learned there


def test_sft_fit_approaches_teacher():
    k = 100
    teacher = B.gaussian_policy(k, 80.0, 300.0)
    x = jax.random.categorical(jax.random.key(0), jnp.log(teacher), shape=(100_000,))
    sft = B.fit_sft(x, jax.random.key(1), num_actions=k, lr=20.0, steps=3000)
    tv = 0.5 * float(jnp.sum(jnp.abs(sft - teacher)))
    assert tv < 0.03, tv
    empirical = jnp.zeros((k,)).at[x].add(1.0) / x.shape[0]
    # Full-batch MLE converges to the empirical distribution (nonzero-count actions).
    seen = empirical > 0
    np.testing.assert_allclose(sft[seen], empirical[seen], atol=2e-3)
    # Minibatch SGD gets there too, up to its noise.
    sft_mb = B.fit_sft(x, jax.random.key(2), num_actions=k, lr=20.0, steps=3000, batch_size=1024)
    assert 0.5 * float(jnp.sum(jnp.abs(sft_mb - teacher))) < 0.06


def test_script_small_run(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "bandit_script", os.path.join(os.path.dirname(__file__), "..", "scripts", "bandit.py")
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    res = mod.main(
        [
            "--out_dir",
            str(tmp_path),
            "--num_pairs",
            "20000",
            "--num_teacher_samples",
            "20000",
            "--reward_steps",
            "2000",
            "--sft_steps",
            "2000",
            "--sft_lr",
            "1.0",
            "--reward_lr",
            "0.1",
        ]
    )
    er = res["expected_reward"]
    assert er["student"] < er["rlaif"] < er["sft"] < er["teacher"]
    assert abs(er["student"] - 40.0) < 0.5
    assert os.path.getsize(tmp_path / "bandit.png") > 10_000
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["config"]["num_pairs"] == 20000
