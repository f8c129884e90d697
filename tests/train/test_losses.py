"""Each loss against its closed form on hand-made numbers, and the DPO family against an
independent, straightforward per-example implementation."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlaif_jax.train.dpo import preference_losses
from rlaif_jax.train.logprobs import sequence_logps, token_logps
from rlaif_jax.train.reward import bradley_terry_losses


def logsig(x):
    return -math.log1p(math.exp(-x))


def reference_loss(pc, pr, rc, rr, loss_type, beta, eps=0.0, gamma=0.0):
    """Scalar textbook formulas, written independently of the vectorised code."""
    if loss_type == "simpo":
        z = beta * (pc - pr) - gamma
        return -(1 - eps) * logsig(z) - eps * logsig(-z)
    h = (pc - pr) - (rc - rr)
    if loss_type == "sigmoid":
        return -(1 - eps) * logsig(beta * h) - eps * logsig(-beta * h)
    if loss_type == "robust":
        return ((1 - eps) * -logsig(beta * h) - eps * -logsig(-beta * h)) / (1 - 2 * eps)
    if loss_type == "ipo":
        return (h - 1 / (2 * beta)) ** 2
    if loss_type == "hinge":
        return max(0.0, 1 - beta * h)
    raise ValueError(loss_type)


def test_hand_computed_values():
    # h = (-10 - -14) - (-12 - -13) = 3.
    pc, pr, rc, rr = map(jnp.asarray, ([-10.0], [-14.0], [-12.0], [-13.0]))
    kw = dict(beta=0.5)
    sig, cr, rj = preference_losses(pc, pr, rc, rr, loss_type="sigmoid", **kw)
    assert float(sig[0]) == pytest.approx(math.log1p(math.exp(-1.5)), rel=1e-6)
    assert float(cr[0]) == pytest.approx(0.5 * 2.0) and float(rj[0]) == pytest.approx(0.5 * -1.0)
    ipo, _, _ = preference_losses(pc, pr, rc, rr, loss_type="ipo", **kw)
    assert float(ipo[0]) == pytest.approx((3 - 1.0) ** 2)
    hinge, _, _ = preference_losses(pc, pr, rc, rr, loss_type="hinge", beta=0.1)
    assert float(hinge[0]) == pytest.approx(0.7)
    cons, _, _ = preference_losses(pc, pr, rc, rr, loss_type="sigmoid", beta=0.5, label_smoothing=0.1)
    assert float(cons[0]) == pytest.approx(0.9 * math.log1p(math.exp(-1.5)) + 0.1 * math.log1p(math.exp(1.5)), rel=1e-6)
    simpo, _, _ = preference_losses(pc, pr, rc, rr, loss_type="simpo", beta=2.0, simpo_gamma=1.0)
    assert float(simpo[0]) == pytest.approx(math.log1p(math.exp(-(2.0 * 4 - 1.0))), rel=1e-5)
    bt = bradley_terry_losses(jnp.asarray([1.0]), jnp.asarray([-0.5]), margin=0.5)
    assert float(bt[0]) == pytest.approx(math.log1p(math.exp(-1.0)), rel=1e-6)


@pytest.mark.parametrize(
    "loss_type,eps",
    [
        ("sigmoid", 0.0),
        ("sigmoid", 0.2),
        ("robust", 0.2),
        ("ipo", 0.0),
        ("hinge", 0.0),
        ("simpo", 0.0),
        ("simpo", 0.2),
    ],
)
def test_against_independent_implementation(loss_type, eps):
    rs = np.random.RandomState(0)
    pc, pr, rc, rr = (rs.uniform(-30, -5, 16).astype(np.float32) for _ in range(4))
    beta, gamma = 0.3, 0.4
    ours, _, _ = preference_losses(
        pc, pr, rc, rr, loss_type=loss_type, beta=beta, label_smoothing=eps, simpo_gamma=gamma
    )
    ref = [reference_loss(*v, loss_type, beta, eps, gamma) for v in zip(pc, pr, rc, rr)]
    np.testing.assert_allclose(np.asarray(ours), ref, rtol=1e-4, atol=1e-5)


def test_robust_dpo_is_unbiased_under_label_noise():
    """Averaged over the label-flip noise (prob eps), robust DPO equals clean DPO."""
    pc, pr, rc, rr = map(jnp.asarray, ([-3.0], [-5.0], [-4.0], [-4.5]))
    eps, beta = 0.2, 0.7
    clean, _, _ = preference_losses(pc, pr, rc, rr, loss_type="sigmoid", beta=beta)
    right, _, _ = preference_losses(pc, pr, rc, rr, loss_type="robust", beta=beta, label_smoothing=eps)
    flipped, _, _ = preference_losses(pr, pc, rr, rc, loss_type="robust", beta=beta, label_smoothing=eps)
    np.testing.assert_allclose((1 - eps) * right + eps * flipped, clean, rtol=1e-5)


def test_token_and_sequence_logps_against_numpy():
    rs = np.random.RandomState(1)
    logits = rs.normal(size=(2, 5, 7)).astype(np.float32)
    tokens = rs.randint(0, 7, (2, 5)).astype(np.int32)
    mask = np.array([[0, 0, 1, 1, 1], [0, 1, 1, 0, 0]], np.float32)
    lp = np.asarray(token_logps(logits, tokens))
    logsm = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    for b in range(2):
        assert lp[b, 0] == 0
        for t in range(1, 5):
            assert lp[b, t] == pytest.approx(logsm[b, t - 1, tokens[b, t]], abs=1e-5)
    s = np.asarray(sequence_logps(logits, tokens, mask))
    np.testing.assert_allclose(s, (lp * mask).sum(-1), rtol=1e-6)
    avg = np.asarray(sequence_logps(logits, tokens, mask, average=True))
    np.testing.assert_allclose(avg, (lp * mask).sum(-1) / mask.sum(-1), rtol=1e-6)
    # Gradient flows only through masked targets.
    g = jax.grad(lambda x: sequence_logps(x, tokens, mask).sum())(jnp.asarray(logits))
    assert float(jnp.abs(g[1, 3:]).sum()) == 0.0
