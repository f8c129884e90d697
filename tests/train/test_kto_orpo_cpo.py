"""KTO, ORPO and CPO (with SimPO and AlphaPO): losses and metrics against closed forms written
here in numpy, gradients against hand-derived derivatives pushed through the model's
log-probs, and KTO's step-batch KL reference point exact under gradient accumulation and
data-parallel sharding (slow)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlaif_jax import sharding as shd
from rlaif_jax.errors import ConfigError
from rlaif_jax.models import build_model, init_params
from rlaif_jax.train import CPO, KTO, ORPO, create_state, make_optimizer, make_train_step
from rlaif_jax.train.cpo import alphapo_rewards
from rlaif_jax.train.kto import KL_KEY, kto_losses
from rlaif_jax.train.objectives import concat_pairs, response_logps
from rlaif_jax.train.orpo import log1mexp, log_odds_ratio
from tests.train.fixtures import random_rows, tiny_config

B, T, V = 4, 12, 16
SEQ = ("tokens", "positions", "segment_ids", "loss_mask")


def sig(x):
    return 1 / (1 + np.exp(-x))


def logsig(x):
    return -np.log1p(np.exp(-x))


def _rows(rs, n, lengths, prefix=""):
    return random_rows(rs, n, lengths, T, V, prefix)


@pytest.fixture(scope="module")
def setup():
    rs = np.random.RandomState(0)
    pairs = {**_rows(rs, B, [3, 7, 5, 2], "chosen_"), **_rows(rs, B, [6, 2, 4, 8], "rejected_")}
    labelled = {**_rows(rs, 6, [3, 7, 5, 2, 6, 4]), **_rows(rs, 6, [5, 3, 2, 7, 4, 6], "kl_")}
    labelled["label"] = np.asarray([1, 0, 1, 1, 0, 0], np.float32)
    model = build_model(tiny_config(V, num_layers=1))
    policy, ref = init_params(model, jax.random.key(1)), init_params(model, jax.random.key(2))

    @jax.jit
    def sums(params, rows):
        return response_logps(model, params, rows)[1]

    return dict(model=model, policy=policy, ref=ref, pairs=pairs, labelled=labelled, sums=sums)


def _mean(m):
    return {k: float(s) / float(c) for k, (s, c) in m.items()}


def _grad_via_logps(setup, rows, cotangent):
    """The param gradient of sum_i cotangent_i * logp_i(params): the chain rule through the
    model's summed log-probs with hand-derived d loss / d logp."""
    _, vjp = jax.vjp(lambda p: setup["sums"](p, rows), setup["policy"])
    return jax.jit(vjp)(jnp.asarray(cotangent, jnp.float32))[0]


def _loss(obj, setup, batch, ref=None):
    """obj.loss on the policy, jitted (one compile instead of many op-by-op dispatches)."""
    return jax.jit(lambda p, b, r: obj.loss(setup["model"], p, b, r, None))(setup["policy"], batch, ref)


def _grad(obj, setup, batch, ref=None):
    return jax.jit(jax.grad(lambda p, b, r: obj.loss(setup["model"], p, b, r, None)[0]))(setup["policy"], batch, ref)


def _assert_tree_close(a, b, rtol=2e-4):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    scale = max(float(jnp.abs(x).max()) for x in lb)
    for x, y in zip(la, lb):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=rtol * scale)


# -- closed forms on hand-made numbers ----------------------------------------------------


def test_kto_losses_hand_values():
    r = jnp.asarray([1.0, 1.0, -2.0])
    d = jnp.asarray([True, False, False])
    got = kto_losses(r, d, 0.5, beta=0.2, desirable_weight=1.5, undesirable_weight=0.5)
    want = [1.5 * (1 - sig(0.2 * 0.5)), 0.5 * (1 - sig(0.2 * -0.5)), 0.5 * (1 - sig(0.2 * 2.5))]
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6)
    apo = kto_losses(r, d, 0.5, beta=0.2, loss_type="apo_zero_unpaired")
    np.testing.assert_allclose(np.asarray(apo), [1 - sig(0.2), sig(0.2), sig(-0.4)], rtol=1e-6)


def test_orpo_log_odds_and_alphapo_hand_values():
    pc, pr = math.log(0.6), math.log(0.2)
    want = math.log(0.6 / 0.4) - math.log(0.2 / 0.8)
    assert float(log_odds_ratio(jnp.asarray(pc), jnp.asarray(pr))) == pytest.approx(want, rel=1e-6)
    for x in (-1e-5, -0.3, -0.7, -5.0, -40.0):
        assert float(log1mexp(jnp.asarray(x))) == pytest.approx(math.log(-math.expm1(x)), rel=1e-5)
    assert float(alphapo_rewards(jnp.asarray(math.log(0.5)), 0.5)) == pytest.approx((1 - 0.5**-0.5) / 0.5, rel=1e-6)
    # alpha -> 0 recovers the log-prob (SimPO)
    assert float(alphapo_rewards(jnp.asarray(-1.3), 1e-4)) == pytest.approx(-1.3, rel=1e-3)


# -- whole objectives on a tiny model ------------------------------------------------------


def _pair_logps(setup):
    both = concat_pairs(setup["pairs"])
    sums = np.asarray(setup["sums"](setup["policy"], both), np.float64)
    n = np.asarray(both["loss_mask"]).sum(-1)
    return both, sums, n


def test_orpo_loss_metrics_and_gradient(setup):
    both, sums, n = _pair_logps(setup)
    beta = 0.25
    obj = ORPO(beta=beta)
    loss_sum, w, m = _loss(obj, setup, setup["pairs"])
    a = sums / n
    ac, ar = a[:B], a[B:]
    lo = (ac - ar) - (np.log1p(-np.exp(ac)) - np.log1p(-np.exp(ar)))
    per_pair = -ac - beta * logsig(lo)
    assert float(w) == B
    assert float(loss_sum) / B == pytest.approx(per_pair.mean(), rel=1e-5)
    mm = _mean(m)
    assert mm["log_odds_chosen"] == pytest.approx(lo.mean(), rel=1e-5)
    assert mm["log_odds_ratio"] == pytest.approx(logsig(lo).mean(), rel=1e-5)
    assert mm["nll_loss"] == pytest.approx(-ac.mean(), rel=1e-5)
    assert mm["rewards/margins"] == pytest.approx(beta * (ac - ar).mean(), rel=1e-5)
    assert mm["logps/rejected"] == pytest.approx(ar.mean(), rel=1e-5)
    # d/da_c = -1 - beta s(-lo) / (1 - p_c); d/da_r = beta s(-lo) / (1 - p_r); a = S / n
    s = sig(-lo)
    d_ac = -1 - beta * s / (1 - np.exp(ac))
    d_ar = beta * s / (1 - np.exp(ar))
    cot = np.concatenate([d_ac, d_ar]) / n
    got = _grad(obj, setup, setup["pairs"])
    _assert_tree_close(got, _grad_via_logps(setup, both, cot))


@pytest.mark.parametrize(
    "loss_type,kw",
    [
        ("sigmoid", dict(cpo_alpha=1.0, label_smoothing=0.1)),
        ("hinge", dict(cpo_alpha=0.5)),
        ("ipo", dict(cpo_alpha=0.0)),
        ("simpo", dict(cpo_alpha=0.0, simpo_gamma=0.5)),
        ("alphapo", dict(alpha=0.5, simpo_gamma=0.3)),
    ],
)
def test_cpo_loss_metrics_and_gradient(setup, loss_type, kw):
    both, sums, n = _pair_logps(setup)
    beta = 2.0 if loss_type in ("simpo", "alphapo") else 0.1
    obj = CPO(loss_type=loss_type, beta=beta, **kw)
    loss_sum, _, m = _loss(obj, setup, setup["pairs"])
    averaged = loss_type in ("ipo", "simpo", "alphapo")
    x = sums / n if averaged else sums
    xc, xr = x[:B], x[B:]
    al = kw.get("alpha", 0.0)
    R = (lambda v: (1 - np.exp(-al * v)) / al) if al else (lambda v: v)
    dR = (lambda v: np.exp(-al * v)) if al else (lambda v: np.ones_like(v))
    h = R(xc) - R(xr)
    e, g = kw.get("label_smoothing", 0.0), kw.get("simpo_gamma", 0.0)
    if loss_type in ("sigmoid", "simpo", "alphapo"):
        z = beta * h - (g if loss_type != "sigmoid" else 0.0)
        pref = -(1 - e) * logsig(z) - e * logsig(-z)
        d_h = beta * (-(1 - e) * sig(-z) + e * sig(z))
    elif loss_type == "hinge":
        pref = np.maximum(0, 1 - beta * h)
        d_h = np.where(1 - beta * h > 0, -beta, 0.0)
    else:
        pref = (h - 1 / (2 * beta)) ** 2
        d_h = 2 * (h - 1 / (2 * beta))
    bc = 0.0 if loss_type == "alphapo" else kw.get("cpo_alpha", 1.0)
    nll = -(sums[:B] / n[:B])
    assert float(loss_sum) / B == pytest.approx((pref + bc * nll).mean(), rel=1e-5)
    mm = _mean(m)
    assert mm["rewards/chosen"] == pytest.approx(beta * R(xc).mean(), rel=1e-5)
    assert mm["logps/chosen"] == pytest.approx(xc.mean(), rel=1e-5)
    assert mm["nll_loss"] == pytest.approx(nll.mean(), rel=1e-5)
    assert mm["rewards/accuracies"] == pytest.approx((R(xc) > R(xr)).mean())
    if loss_type not in ("sigmoid", "alphapo"):
        return  # the model-level gradient of the other types runs through the same code
    scale = 1 / n if averaged else np.ones_like(n)
    cot = np.concatenate([d_h * dR(xc) * scale[:B] - bc / n[:B], -d_h * dR(xr) * scale[B:]])
    got = _grad(obj, setup, setup["pairs"])
    _assert_tree_close(got, _grad_via_logps(setup, both, cot))


@pytest.mark.parametrize("loss_type", ["kto", "apo_zero_unpaired"])
def test_kto_loss_metrics_and_gradient(setup, loss_type):
    lab = setup["labelled"]
    rows = {k: lab[k] for k in SEQ}
    kl_rows = {k: lab[f"kl_{k}"] for k in SEQ}
    pol = np.asarray(setup["sums"](setup["policy"], rows), np.float64)
    ref = np.asarray(setup["sums"](setup["ref"], rows), np.float64)
    kl_pol = np.asarray(setup["sums"](setup["policy"], kl_rows), np.float64)
    kl_ref = np.asarray(setup["sums"](setup["ref"], kl_rows), np.float64)
    z0 = max(0.0, (kl_pol - kl_ref).mean()) if loss_type == "kto" else 0.0
    beta, wd, wu = 0.5, 1.2, 0.8
    obj = KTO(beta=beta, desirable_weight=wd, undesirable_weight=wu, loss_type=loss_type)
    loss_sum, w, m = _loss(obj, setup, lab, setup["ref"])
    r = pol - ref
    d = lab["label"] > 0.5
    if loss_type == "kto":
        per = np.where(d, wd * (1 - sig(beta * (r - z0))), wu * (1 - sig(beta * (z0 - r))))
        # d/dr: desirable -wd beta s'(beta (r - z0)); undesirable +wu beta s'(beta (z0 - r))
        u = np.where(d, beta * (r - z0), beta * (z0 - r))
        cot = np.where(d, -wd, wu) * beta * sig(u) * (1 - sig(u))
    else:
        per = np.where(d, wd * (1 - sig(beta * r)), wu * sig(beta * r))
        cot = np.where(d, -wd, wu) * beta * sig(beta * r) * (1 - sig(beta * r))
    assert float(w) == 6
    assert float(loss_sum) / 6 == pytest.approx(per.mean(), rel=1e-5)
    mm = _mean(m)
    assert mm["kl"] == pytest.approx(z0, rel=1e-5, abs=1e-7)
    assert mm["rewards/chosen"] == pytest.approx(beta * r[d].mean(), rel=1e-5)
    assert mm["rewards/rejected"] == pytest.approx(beta * r[~d].mean(), rel=1e-5)
    assert mm["logps/chosen"] == pytest.approx(pol[d].mean(), rel=1e-5)
    assert obj.derived_metrics(mm)["rewards/margins"] == pytest.approx(beta * (r[d].mean() - r[~d].mean()), rel=1e-5)
    if loss_type != "kto":
        return
    # z0 carries no gradient (as TRL's detach): the gradient is that of the per-example terms
    got = _grad(obj, setup, lab, setup["ref"])
    _assert_tree_close(got, _grad_via_logps(setup, rows, cot))


def test_kto_padding_rows_count_for_nothing(setup):
    lab = dict(setup["labelled"])
    obj = KTO(beta=0.5)
    base = _loss(obj, setup, lab, setup["ref"])
    padded = {k: np.concatenate([v, np.zeros_like(v[:2])]) for k, v in lab.items()}
    padded["label"][-2:] = [1, 0]
    got = _loss(obj, setup, padded, setup["ref"])
    assert float(got[1]) == 6 and float(got[0]) == pytest.approx(float(base[0]), rel=1e-5)
    assert _mean(got[2])["kl"] == pytest.approx(_mean(base[2])["kl"], rel=1e-5, abs=1e-7)


def _kto_step(setup, batch, grad_accum, mesh=None):
    layout = None if mesh is None else shd.Layout(mesh, shd.logical_rules())
    model = setup["model"] if mesh is None else build_model(tiny_config(V, num_layers=1), layout=layout)
    tx, sched = make_optimizer(name="sgd", learning_rate=0.5, clip_norm=None)
    state = create_state(setup["policy"], tx, 0)
    step = jax.jit(make_train_step(KTO(beta=0.5), model, tx, sched, grad_accum))
    b = batch if mesh is None else shd.shard_batch(batch, mesh)
    state, metrics = step(state, b, setup["ref"])
    return jax.device_get(state.params), jax.device_get(metrics)


def _kto_batch():
    rs = np.random.RandomState(5)
    batch = {**_rows(rs, 8, [3, 7, 5, 2, 6, 4, 8, 1]), **_rows(rs, 8, [5, 3, 2, 7, 4, 6, 1, 8], "kl_")}
    batch["label"] = np.asarray([1, 0, 1, 1, 0, 0, 1, 0], np.float32)
    return batch


def test_kto_step_batch_kl_is_exact_under_accumulation(setup):
    batch = _kto_batch()
    p1, m1 = _kto_step(setup, batch, 1)
    # the reference point is the whole batch's, so every micro-batch's loss uses the same z0
    z0 = _mean({"kl": KTO(beta=0.5).batch_statistics(setup["model"], setup["policy"], batch, setup["ref"])[KL_KEY]})
    assert m1["kl"] == pytest.approx(max(0.0, z0["kl"]), rel=1e-5, abs=1e-7)
    p4, m4 = _kto_step(setup, batch, 4)
    assert m4["kl"] == pytest.approx(m1["kl"], rel=1e-5, abs=1e-7)
    assert m4["loss"] == pytest.approx(m1["loss"], rel=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-6, rtol=1e-5), p1, p4)
    assert "rewards/margins" in m1


@pytest.mark.slow
def test_kto_step_batch_kl_is_exact_over_data_shards(setup):
    batch = _kto_batch()
    p1, m1 = _kto_step(setup, batch, 1)
    p8, m8 = _kto_step(setup, batch, 2, mesh=shd.make_mesh(8, 1, 1))
    assert m8["kl"] == pytest.approx(m1["kl"], rel=1e-5, abs=1e-7)
    assert m8["loss"] == pytest.approx(m1["loss"], rel=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4), p1, p8)


def test_bad_settings_name_the_binding():
    with pytest.raises(ConfigError, match="CPO.alpha"):
        CPO(loss_type="alphapo")
    with pytest.raises(ConfigError, match="KTO.loss_type"):
        KTO(loss_type="sigmoid")
    with pytest.raises(ConfigError, match="ORPO.beta"):
        ORPO(beta=0)
    with pytest.raises(ConfigError, match="KTO.desirable_weight"):
        KTO(desirable_weight=-1)
