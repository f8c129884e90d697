"""convention="trl" (DPO) and the TRL flags of PPOConfig give TRL's numbers on the same
inputs; the defaults keep ours. TRL's formulas are restated in torch below from
trl 1.16.0 (DPOTrainer._compute_loss: "ipo", "sft"; CPOTrainer for SimPO's logps;
GRPOTrainer / RLOOTrainer._generate_and_score_completions for group advantages)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlaif_jax.models import apply, build_model, init_params
from rlaif_jax.train import DPO
from rlaif_jax.train.advantages import group_advantages
from rlaif_jax.train.logprobs import token_logps
from rlaif_jax.train.objectives import concat_pairs
from tests.train.fixtures import tiny_config

torch = pytest.importorskip("torch", reason="TRL's formulas are restated in torch (the test extra)")

B, T, V = 3, 12, 16


@pytest.fixture(scope="module")
def setup():
    rs = np.random.RandomState(0)
    lengths = {"chosen": [3, 7, 5], "rejected": [6, 2, 4]}
    batch = {}
    for side in ("chosen", "rejected"):
        batch[f"{side}_tokens"] = rs.randint(3, V, (B, T)).astype(np.int32)
        batch[f"{side}_positions"] = np.tile(np.arange(T, dtype=np.int32), (B, 1))
        batch[f"{side}_segment_ids"] = np.ones((B, T), np.int32)
        mask = np.zeros((B, T), np.int32)
        for i, n in enumerate(lengths[side]):
            mask[i, 4 : 4 + n] = 1
        batch[f"{side}_loss_mask"] = mask
    model = build_model(tiny_config(V))
    policy, ref = init_params(model, jax.random.key(1)), init_params(model, jax.random.key(2))
    both = concat_pairs(batch)

    def tok_lp(params):
        out = apply(model, params, both["tokens"], both["positions"], both["segment_ids"])
        return torch.tensor(np.asarray(token_logps(out["logits"], both["tokens"]), np.float64))

    return dict(
        batch=batch,
        model=model,
        policy=policy,
        ref=ref,
        lp=tok_lp(policy),
        ref_lp=tok_lp(ref),
        mask=torch.tensor(np.asarray(both["loss_mask"], np.float64)),
    )


def _ours(s, **kw):
    loss_sum, weight, m = DPO(**kw).loss(s["model"], s["policy"], s["batch"], s["ref"], None)
    return float(loss_sum) / float(weight), {k: float(v[0]) / float(v[1]) for k, v in m.items()}


def _trl_dpo(s, loss_type, beta, rpo_alpha=0.0):
    """TRL 1.16 DPOTrainer, loss_type=[loss_type] (+ "sft" weighted rpo_alpha for RPO)."""
    lp, ref_lp, mask = s["lp"], s["ref_lp"], s["mask"]
    logps, ref_logps = (lp * mask).sum(1), (ref_lp * mask).sum(1)
    chosen_logps, rejected_logps = logps.chunk(2)
    ref_chosen, ref_rejected = ref_logps.chunk(2)
    chosen_scores, rejected_scores = chosen_logps - ref_chosen, rejected_logps - ref_rejected
    if loss_type == "ipo":
        chosen_mask, rejected_mask = mask.chunk(2)
        delta = chosen_scores / chosen_mask.sum(1).clamp(min=1.0) - rejected_scores / rejected_mask.sum(1).clamp(
            min=1.0
        )
        loss = ((delta - 1 / (2 * beta)) ** 2).mean()
    else:
        loss = -torch.nn.functional.logsigmoid(beta * (chosen_scores - rejected_scores)).mean()
    if rpo_alpha:
        chosen_mask, _ = mask.chunk(2)
        chosen_lp, _ = lp.chunk(2)
        loss = loss + rpo_alpha * -chosen_lp[chosen_mask.bool()].mean()
    metrics = {
        "rewards/chosen": (beta * chosen_scores).mean(),
        "rewards/rejected": (beta * rejected_scores).mean(),
        "rewards/margins": (beta * (chosen_scores - rejected_scores)).mean(),
        "logps/chosen": chosen_logps.mean(),
        "logps/rejected": rejected_logps.mean(),
    }
    return float(loss), {k: float(v) for k, v in metrics.items()}


def _trl_simpo(s, beta, gamma):
    """TRL 1.16 CPOTrainer, loss_type="simpo", cpo_alpha=0: average_log_prob for the loss,
    rewards and logged logps alike."""
    lp, mask = s["lp"], s["mask"]
    logps = (lp * mask).sum(-1) / mask.sum(-1)
    c, r = logps.chunk(2)
    logits = (c - r) - gamma / beta
    loss = -torch.nn.functional.logsigmoid(beta * logits).mean()
    return float(loss), {
        "rewards/chosen": float((beta * c).mean()),
        "logps/chosen": float(c.mean()),
        "logps/rejected": float(r.mean()),
    }


@pytest.mark.parametrize("average_log_prob", [False, True])
def test_ipo_trl_convention_matches_trl(setup, average_log_prob):
    loss, m = _ours(setup, loss_type="ipo", beta=0.3, convention="trl", average_log_prob=average_log_prob)
    want, wm = _trl_dpo(setup, "ipo", 0.3)
    assert loss == pytest.approx(want, rel=1e-5)
    for k in ("rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected"):
        assert m[k] == pytest.approx(wm[k], rel=1e-5, abs=1e-6), k
    # ours: IPO on summed log-probs (the default), rewards on the scale the loss uses
    ours, om = _ours(setup, loss_type="ipo", beta=0.3)
    assert ours != pytest.approx(want, rel=1e-2)
    _, om_avg = _ours(setup, loss_type="ipo", beta=0.3, average_log_prob=True)
    assert om_avg["rewards/margins"] != pytest.approx(wm["rewards/margins"], rel=1e-2)
    assert om["rewards/margins"] == pytest.approx(wm["rewards/margins"], rel=1e-5)


def test_rpo_trl_convention_matches_trl(setup):
    loss, _ = _ours(setup, loss_type="sigmoid", beta=0.1, rpo_alpha=0.7, convention="trl")
    want, _ = _trl_dpo(setup, "sigmoid", 0.1, rpo_alpha=0.7)
    assert loss == pytest.approx(want, rel=1e-5)
    # ours: per-sequence average NLL, then the mean over pairs
    ours, m = _ours(setup, loss_type="sigmoid", beta=0.1, rpo_alpha=0.7)
    base, _ = _ours(setup, loss_type="sigmoid", beta=0.1)
    chosen_lp, chosen_mask = setup["lp"].chunk(2)[0], setup["mask"].chunk(2)[0]
    per_seq = -((chosen_lp * chosen_mask).sum(1) / chosen_mask.sum(1)).mean()
    assert ours == pytest.approx(base + 0.7 * float(per_seq), rel=1e-5)
    assert ours != pytest.approx(want, rel=1e-3)


def test_simpo_trl_convention_logs_average_logps(setup):
    loss, m = _ours(setup, loss_type="simpo", beta=2.0, simpo_gamma=0.5, convention="trl")
    want, wm = _trl_simpo(setup, 2.0, 0.5)
    assert loss == pytest.approx(want, rel=1e-5)
    for k, v in wm.items():
        assert m[k] == pytest.approx(v, rel=1e-5), k
    ours_loss, om = _ours(setup, loss_type="simpo", beta=2.0, simpo_gamma=0.5)
    assert ours_loss == pytest.approx(want, rel=1e-5)  # the loss itself is the same
    sums = (setup["lp"] * setup["mask"]).sum(1).chunk(2)[0]
    assert om["logps/chosen"] == pytest.approx(float(sums.mean()), rel=1e-5)


def test_sigmoid_dpo_is_the_same_in_both_conventions(setup):
    a, am = _ours(setup, loss_type="sigmoid", beta=0.1)
    b, bm = _ours(setup, loss_type="sigmoid", beta=0.1, convention="trl")
    want, wm = _trl_dpo(setup, "sigmoid", 0.1)
    assert a == b == pytest.approx(want, rel=1e-5)
    assert am == bm


def test_bad_convention_names_the_field():
    with pytest.raises(ValueError, match="DPO.convention"):
        DPO(convention="TRL")


def _trl_nanstd(x, dim):
    mean = torch.nanmean(x, dim=dim, keepdim=True)
    var = torch.nanmean((x - mean) ** 2, dim=dim, keepdim=True)
    n = torch.sum(~torch.isnan(x), dim=dim, keepdim=True)
    return torch.sqrt(var * n / (n - 1)).squeeze(dim)


def test_grpo_std_conventions():
    rs = np.random.RandomState(3)
    k = 4
    scores = rs.normal(size=8 * k).astype(np.float32)
    scores[:k] = 1.0  # a group with zero spread: both conventions give zero advantages
    r = torch.tensor(scores, dtype=torch.float64)
    mean = torch.nanmean(r.view(-1, k), 1).repeat_interleave(k)
    std = _trl_nanstd(r.view(-1, k), 1).repeat_interleave(k)
    trl = ((r - mean) / (std + 1e-4)).numpy()
    ours_trl = np.asarray(group_advantages(jnp.asarray(scores), k, "grpo", std="sample"))
    np.testing.assert_allclose(ours_trl, trl, rtol=1e-5, atol=1e-6)
    pop = np.asarray(group_advantages(jnp.asarray(scores), k, "grpo"))
    s = scores.reshape(-1, k)
    np.testing.assert_allclose(
        pop, ((s - s.mean(1, keepdims=True)) / (s.std(1, keepdims=True) + 1e-6)).ravel(), rtol=1e-5, atol=1e-6
    )
    assert not np.allclose(pop, trl, rtol=1e-3)
    with pytest.raises(ValueError, match="std"):
        group_advantages(jnp.asarray(scores), k, "grpo", std="unbiased")


def test_rloo_baseline_equals_trl():
    rs = np.random.RandomState(4)
    k = 3
    scores = rs.normal(size=5 * k).astype(np.float32)
    g = torch.tensor(scores, dtype=torch.float64).view(-1, k)
    trl = (g - (g.sum(1, keepdim=True) - g) / (k - 1)).view(-1).numpy()
    np.testing.assert_allclose(np.asarray(group_advantages(jnp.asarray(scores), k, "rloo")), trl, rtol=1e-5, atol=1e-6)


def test_rloo_batch_normalization_equals_trl():
    from rlaif_jax.train.advantages import normalize_sequences

    rs = np.random.RandomState(5)
    a = rs.normal(size=12).astype(np.float32)
    t = torch.tensor(a, dtype=torch.float64)
    trl = ((t - torch.nanmean(t)) / (_trl_nanstd(t.view(1, -1), 1) + 1e-4)).numpy()
    np.testing.assert_allclose(np.asarray(normalize_sequences(jnp.asarray(a))), trl, rtol=1e-5, atol=1e-6)


def test_ppo_config_group_flags():
    from rlaif_jax.train.ppo import PPOConfig

    c = PPOConfig(advantage_estimator="grpo", samples_per_prompt=2, grpo_std="sample", group_normalization="none")
    assert c.grpo_std == "sample"
    assert PPOConfig().group_normalization == "whiten" and PPOConfig().grpo_std == "population"
    with pytest.raises(ValueError, match="group_normalization"):
        PPOConfig(group_normalization="tokens")
    with pytest.raises(ValueError, match="grpo_std"):
        PPOConfig(grpo_std="unbiased")
