"""PPO pieces against closed forms, and PPO / RLOO raising a programmatic reward on a tiny
model while the KL stays bounded."""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from rlaif_jax import sharding as shd
from rlaif_jax.models import build_model, init_params
from rlaif_jax.models.hf_io import save_hf
from rlaif_jax.train.advantages import KLController, gae, group_advantages, kl_estimate, whiten
from rlaif_jax.train.metrics import read_jsonl
from rlaif_jax.train.optim import make_optimizer
from rlaif_jax.train.ppo import PPOConfig, train_ppo
from rlaif_jax.train.run_loop import LoopSettings
from tests.train.fixtures import make_world, tiny_config

ONE_DEVICE = functools.partial(shd.make_mesh, 1, 1, 1, devices=jax.devices()[:1])


def numpy_gae(rewards, values, lengths, gamma, lam):
    B, T = rewards.shape
    adv = np.zeros((B, T))
    for b in range(B):
        last = 0.0
        for t in reversed(range(lengths[b])):
            nxt = values[b, t + 1] if t + 1 < lengths[b] else 0.0
            delta = rewards[b, t] + gamma * nxt - values[b, t]
            last = delta + gamma * lam * last
            adv[b, t] = last
    return adv


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.5), (0.99, 1.0)])
def test_gae_matches_reference_loop(gamma, lam):
    rs = np.random.RandomState(0)
    rewards, values = rs.normal(size=(5, 7)), rs.normal(size=(5, 7))
    lengths = np.array([7, 3, 1, 5, 6])
    mask = (np.arange(7)[None] < lengths[:, None]).astype(np.float32)
    adv, ret = gae(jnp.asarray(rewards * mask), jnp.asarray(values * mask), jnp.asarray(mask), gamma, lam)
    ref = numpy_gae(rewards, values, lengths, gamma, lam)
    np.testing.assert_allclose(np.asarray(adv), ref, atol=1e-5)
    np.testing.assert_allclose(np.asarray(ret), (ref + values) * mask, atol=1e-5)


def test_gae_closed_form_lambda_one_is_discounted_return_minus_value():
    r = np.array([[0.0, 0.0, 1.0]])
    v = np.array([[0.2, 0.5, 0.1]])
    adv, _ = gae(jnp.asarray(r), jnp.asarray(v), jnp.ones((1, 3)), 0.9, 1.0)
    np.testing.assert_allclose(np.asarray(adv)[0], [0.81 - 0.2, 0.9 - 0.5, 1.0 - 0.1], atol=1e-6)


def test_kl_estimators_against_exact_kl():
    """Sampling from p, k1 and k3 are unbiased for KL(p||q); k2 approximates it closely for
    nearby distributions; k3 is never negative."""
    p = np.array([0.5, 0.3, 0.2])
    q = np.array([0.4, 0.4, 0.2])
    exact = float((p * np.log(p / q)).sum())
    logp, logq = jnp.log(jnp.asarray(p)), jnp.log(jnp.asarray(q))
    expect = {e: float((p * np.asarray(kl_estimate(logp, logq, e))).sum()) for e in ("k1", "k2", "k3")}
    assert expect["k1"] == pytest.approx(exact, rel=1e-5)
    assert expect["k3"] == pytest.approx(exact, rel=1e-5)
    assert expect["k2"] == pytest.approx(exact, rel=0.1)
    assert float(kl_estimate(jnp.asarray(-1.0), jnp.asarray(-3.0), "k3")) >= 0
    assert float(kl_estimate(jnp.asarray(-1.0), jnp.asarray(-3.0), "k2")) == pytest.approx(2.0)
    with pytest.raises(ValueError):
        kl_estimate(logp, logq, "k4")


def test_adaptive_kl_controller_rule():
    fixed = KLController(init_coef=0.1)
    assert fixed.update(0.1, 100.0, 64) == 0.1
    ctl = KLController(init_coef=0.1, target=6.0, horizon=10000)
    # error = clip(12/6 - 1, -0.2, 0.2) = 0.2 -> coef * (1 + 0.2 * 64 / 10000)
    assert float(ctl.update(0.1, 12.0, 64)) == pytest.approx(0.1 * (1 + 0.2 * 64 / 10000))
    assert float(ctl.update(0.1, 5.4, 100)) == pytest.approx(0.1 * (1 - 0.1 * 100 / 10000))
    assert float(ctl.update(0.1, 0.0, 10000)) == pytest.approx(0.1 * 0.8)


def test_group_advantages_and_whitening():
    s = jnp.asarray([1.0, 2.0, 3.0, 5.0, 5.0, 5.0])
    rloo = np.asarray(group_advantages(s, 3, "rloo"))
    np.testing.assert_allclose(rloo, [1 - 2.5, 2 - 2.0, 3 - 1.5, 0, 0, 0])
    grpo = np.asarray(group_advantages(s, 3, "grpo"))
    np.testing.assert_allclose(grpo[:3], (np.array([1, 2, 3]) - 2) / (np.std([1, 2, 3]) + 1e-6), rtol=1e-5)
    x = jnp.asarray([[1.0, 2.0, 100.0], [3.0, 4.0, -7.0]])
    m = jnp.asarray([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
    w = np.asarray(whiten(x, m))
    vals = w[np.asarray(m) > 0]
    assert abs(vals.mean()) < 1e-6 and abs(vals.std(ddof=1) - 1) < 1e-4 and w[0, 2] == 0


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("ppo")
    tok, tok_dir, demos, prefs = make_world(str(root))
    cfg = tiny_config(len(tok))
    params = init_params(build_model(cfg), jax.random.key(0))
    save_hf(str(root / "policy"), cfg, params, tokenizer=tok)
    return str(root / "policy"), demos, tok


def _target_reward(token_id):
    """Fraction of the response that is `token_id` (the programmatic reward)."""

    def reward(tokens, positions, segs, rmask, P):
        resp = tokens[:, P:]
        return ((resp == token_id) * rmask).sum(1) / jnp.maximum(rmask.sum(1), 1)

    return reward


@pytest.mark.parametrize(
    "estimator,value_model",
    # GAE with a separate value model (the paper's) also runs in the resume and arm tests.
    [pytest.param("gae", "separate", marks=pytest.mark.slow), ("gae", "shared"), ("rloo", "separate")],
)
def test_ppo_raises_a_programmatic_reward_with_bounded_kl(policy_dir, tmp_path, estimator, value_model):
    policy, demos, tok = policy_dir
    target = tok.convert_tokens_to_ids("cat")
    k = 4 if estimator == "rloo" else 1
    config = PPOConfig(
        rollout_batch_size=16 // k,
        samples_per_prompt=k,
        mini_batch_size=8,
        ppo_epochs=2,
        max_new_tokens=6,
        max_prompt_length=16,
        advantage_estimator=estimator,
        value_model=value_model,
        vf_coef=0.5,
    )
    out = train_ppo(
        run_dir=str(tmp_path),
        policy=policy,
        prompts=demos,
        num_iterations=30,
        config=config,
        reward_fn=_target_reward(target),
        kl=KLController(init_coef=0.05),
        optimizer=functools.partial(make_optimizer, learning_rate=3e-3),
        mesh=ONE_DEVICE,
        seed=1,
    )
    rows = read_jsonl(str(tmp_path / "metrics.jsonl"))
    first = np.mean([r["objective/scores"] for r in rows[:3]])
    final = np.mean([r["objective/scores"] for r in rows[-5:]])
    assert final > first + 0.25, (first, final)
    # The KL penalty holds the policy well short of collapse (every token "cat" would be
    # about 6 * log(vocab) = 19 nats from the reference).
    assert np.mean([r["objective/kl"] for r in rows[-5:]]) < 12.0
    for key in (
        "policy/clipfrac_avg",
        "policy/approxkl_avg",
        "loss/policy_avg",
        "val/ratio",
        "objective/entropy",
        "objective/rlhf_reward",
        "val/num_eos_tokens",
        "time/rollout",
        "time/update",
    ):
        assert key in out
    if estimator == "gae":
        assert "loss/value_avg" in out
    assert os.path.exists(tmp_path / "hf" / "model.safetensors")
    for f in ("config.gin", "operative_config.gin", "summary.json"):  # as every run directory
        assert os.path.exists(tmp_path / f), f


def test_ppo_resume_is_exact(policy_dir, tmp_path):
    policy, demos, tok = policy_dir
    config = PPOConfig(rollout_batch_size=8, mini_batch_size=4, ppo_epochs=1, max_new_tokens=4, max_prompt_length=16)
    kw = dict(
        policy=policy,
        prompts=demos,
        num_iterations=4,
        config=config,
        reward_fn=_target_reward(5),
        kl=KLController(init_coef=0.05, target=1.0, horizon=100),
        optimizer=functools.partial(make_optimizer, learning_rate=1e-3),
        mesh=ONE_DEVICE,
        loop=LoopSettings(checkpoint_every=2),
    )
    train_ppo(run_dir=str(tmp_path / "a"), **kw)
    train_ppo(run_dir=str(tmp_path / "b"), stop_after=3, **kw)
    train_ppo(run_dir=str(tmp_path / "b"), **kw)
    a = load_file(str(tmp_path / "a" / "hf" / "model.safetensors"))
    b = load_file(str(tmp_path / "b" / "hf" / "model.safetensors"))
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    # Iteration 3, logged before the stop and again after resuming from 2, appears once.
    steps = [r["step"] for r in read_jsonl(str(tmp_path / "b" / "metrics.jsonl"))]
    assert steps == [r["step"] for r in read_jsonl(str(tmp_path / "a" / "metrics.jsonl"))] == [1, 2, 3, 4]


def test_numerics_reach_the_models_loaded_from_hf_exports(policy_dir, tmp_path, monkeypatch):
    """train_ppo.numerics sets what an HF export's config.json cannot (dtype, remat) on every
    model it loads; an architecture field there is refused before anything loads."""
    from rlaif_jax.errors import ConfigError
    from rlaif_jax.train import ppo

    policy, demos, tok = policy_dir
    loaded = []

    def spy(*a, **kw):
        cfg, params = load_hf(*a, **kw)
        loaded.append(cfg)
        return cfg, params

    load_hf = ppo.load_hf
    monkeypatch.setattr(ppo, "load_hf", spy)
    config = PPOConfig(rollout_batch_size=8, mini_batch_size=4, ppo_epochs=1, max_new_tokens=4, max_prompt_length=16)
    kw = dict(
        policy=policy, prompts=demos, num_iterations=1, config=config, reward_fn=_target_reward(5), mesh=ONE_DEVICE
    )
    numerics = {"dtype": "bfloat16", "remat_policy": "dots", "vocab_chunk_size": 7}  # chunked log-probs too
    out = train_ppo(run_dir=str(tmp_path / "a"), numerics=numerics, **kw)
    assert np.isfinite(out["loss"])
    got = [(c.dtype, c.param_dtype, c.remat_policy, c.vocab_chunk_size) for c in loaded]
    assert got == [("bfloat16", "float32", "dots", 7)]
    with pytest.raises(ConfigError, match=r"train_ppo.numerics has 'num_layers': only the numerics dtype, "):
        train_ppo(run_dir=str(tmp_path / "b"), numerics={"num_layers": 1}, **kw)


def test_bad_ppo_configs_are_rejected():
    with pytest.raises(ValueError, match="samples_per_prompt"):
        PPOConfig(advantage_estimator="grpo", samples_per_prompt=1)
    with pytest.raises(ValueError, match="mini-batches"):
        PPOConfig(rollout_batch_size=10, mini_batch_size=4)
    with pytest.raises(ValueError, match="temperature"):
        PPOConfig(temperature=0.0)


def test_a_non_finite_ppo_loss_stops_the_run_before_a_checkpoint_of_it(policy_dir, tmp_path):
    from rlaif_jax.train.loop import NonFiniteLossError

    policy, demos, tok = policy_dir
    config = PPOConfig(rollout_batch_size=8, mini_batch_size=4, ppo_epochs=1, max_new_tokens=4, max_prompt_length=16)
    nan_reward = lambda tokens, positions, segs, rmask, P: rmask.sum(1) * jnp.nan  # noqa: E731
    # Checked on the host when it logs (every 2nd iteration) and before each checkpoint (every one).
    with pytest.raises(
        NonFiniteLossError,
        match=r"non-finite at iteration 0 \(prompt stream position before that "
        r"batch: \{'epoch': 0, 'index': 0\}; batch saved to .*nonfinite",
    ):
        train_ppo(
            run_dir=str(tmp_path),
            policy=policy,
            prompts=demos,
            num_iterations=4,
            config=config,
            reward_fn=nan_reward,
            mesh=ONE_DEVICE,
            loop=LoopSettings(log_every=2, checkpoint_every=1),
        )
    assert not (tmp_path / "checkpoints").exists() or not os.listdir(tmp_path / "checkpoints")
    assert (tmp_path / "nonfinite_batch_iteration0.npz").exists() and not (tmp_path / "hf").exists()


def test_each_trainer_has_its_own_script(tmp_path):
    """scripts/train.py runs `train` only: a PPO config there is one line naming the script."""
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    r = subprocess.run(
        [sys.executable, "scripts/train.py", "--gin_file=configs/experiments/tiny_ppo.gin"],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 2 and "scripts/train_ppo.py" in r.stderr.strip().splitlines()[-1], r.stderr[-2000:]
