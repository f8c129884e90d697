"""KTO, ORPO and CPO/SimPO/AlphaPO with convention="trl" give TRL's numbers on the same logits.

CPO and ORPO call TRL's own functions (trl 1.16: CPOTrainer.get_batch_logps / cpo_loss,
ORPOTrainer.odds_ratio_loss, with a stand-in `self` holding the config); their NLL term is a
closure inside concatenated_forward, restated here. TRL's KTO loss is inline in
KTOTrainer._compute_loss, restated below line for line. TRL is not a default dependency:
`pip install trl accelerate` to run these."""

import types

import jax
import numpy as np
import pytest

from rlaif_jax.models import apply, build_model, init_params
from rlaif_jax.train import CPO, KTO, ORPO
from rlaif_jax.train.objectives import concat_pairs
from tests.train.fixtures import random_rows, tiny_config

torch = pytest.importorskip("torch", reason="TRL runs on torch")
pytest.importorskip("trl", reason="TRL's own loss functions (pip install trl accelerate; not default dependencies)")
pytest.importorskip("accelerate", reason="TRL's trainers import accelerate (pip install accelerate)")
F = torch.nn.functional
cpo_mod = pytest.importorskip("trl.experimental.cpo.cpo_trainer")
orpo_mod = pytest.importorskip("trl.experimental.orpo.orpo_trainer")

B, T, V = 3, 12, 16


def _rows(rs, n, lengths, prefix=""):
    return random_rows(rs, n, lengths, T, V, prefix)


@pytest.fixture(scope="module")
def setup():
    rs = np.random.RandomState(0)
    pairs = {**_rows(rs, B, [3, 7, 5], "chosen_"), **_rows(rs, B, [6, 2, 4], "rejected_")}
    model = build_model(tiny_config(V))
    policy, ref = init_params(model, jax.random.key(1)), init_params(model, jax.random.key(2))

    def logits_labels(params, rows):
        out = apply(model, params, rows["tokens"], rows["positions"], rows["segment_ids"])
        labels = np.where(np.asarray(rows["loss_mask"]) > 0, np.asarray(rows["tokens"]), -100)
        return torch.tensor(np.asarray(out["logits"], np.float64)), torch.tensor(labels, dtype=torch.long)

    return dict(model=model, policy=policy, ref=ref, pairs=pairs, rs=rs, logits_labels=logits_labels)


def _ours(obj, setup, batch, ref=None):
    loss_sum, weight, m = obj.loss(setup["model"], setup["policy"], batch, ref, None)
    means = {k: float(s) / float(c) for k, (s, c) in m.items()}
    return float(loss_sum) / float(weight), {
        **means,
        **(obj.derived_metrics(means) if hasattr(obj, "derived_metrics") else {}),
    }


def _trl_nll(logits, labels):
    """CPOTrainer/ORPOTrainer.concatenated_forward's cross_entropy_loss (decoder-only)."""
    logits, labels = logits[..., :-1, :].contiguous(), labels[..., 1:].contiguous()
    return torch.nn.CrossEntropyLoss()(logits.view(-1, logits.shape[-1]), labels.view(-1))


def _check(ours, want, keys):
    for k in keys:
        assert ours[k] == pytest.approx(want[k], rel=1e-5, abs=1e-6), k


@pytest.mark.parametrize(
    "loss_type,kw",
    [
        ("sigmoid", dict(beta=0.1, cpo_alpha=1.0, label_smoothing=0.1)),
        ("hinge", dict(beta=0.1, cpo_alpha=0.5)),
        ("ipo", dict(beta=0.1, cpo_alpha=1.0)),
        ("simpo", dict(beta=2.0, cpo_alpha=0.0, simpo_gamma=0.5)),
        ("alphapo", dict(beta=2.0, alpha=0.3, simpo_gamma=0.5)),
    ],
)
def test_cpo_matches_trl(setup, loss_type, kw):
    logits, labels = setup["logits_labels"](setup["policy"], concat_pairs(setup["pairs"]))
    # CPOConfig.__post_init__ turns "alphapo" into simpo with cpo_alpha = 0
    trl_type, cpo_alpha = ("simpo", 0.0) if loss_type == "alphapo" else (loss_type, kw.get("cpo_alpha", 1.0))
    cfg = types.SimpleNamespace(
        loss_type=trl_type,
        beta=kw["beta"],
        label_smoothing=kw.get("label_smoothing", 0.0),
        simpo_gamma=kw.get("simpo_gamma", 0.5),
        alpha=kw.get("alpha", 0.0),
        accelerator=types.SimpleNamespace(device="cpu"),
    )
    logps = cpo_mod.CPOTrainer.get_batch_logps(logits, labels, average_log_prob=trl_type in ["ipo", "simpo"])
    c, r = logps[:B], logps[B:]
    losses, cr, rr = cpo_mod.CPOTrainer.cpo_loss(cfg, c, r)
    nll = _trl_nll(logits[:B], labels[:B]) if cpo_alpha else torch.tensor(0.0)
    want = {
        "loss": float(losses.mean() + cpo_alpha * nll),
        "rewards/chosen": float(cr.mean()),
        "rewards/rejected": float(rr.mean()),
        "rewards/margins": float((cr - rr).mean()),
        "rewards/accuracies": float((cr > rr).float().mean()),
        "logps/chosen": float(c.mean()),
        "logps/rejected": float(r.mean()),
        "nll_loss": float(_trl_nll(logits[:B], labels[:B])),  # ours logs it even when unweighted
    }
    loss, m = _ours(CPO(loss_type=loss_type, convention="trl", **kw), setup, setup["pairs"])
    assert loss == pytest.approx(want["loss"], rel=1e-5)
    _check(m, want, [k for k in want if k != "loss"])


def test_orpo_matches_trl(setup):
    logits, labels = setup["logits_labels"](setup["policy"], concat_pairs(setup["pairs"]))
    beta = 0.3
    cfg = types.SimpleNamespace(beta=beta, accelerator=types.SimpleNamespace(device="cpu"))
    logps = orpo_mod.ORPOTrainer.get_batch_logps(logits, labels, average_log_prob=True)
    c, r = logps[:B], logps[B:]
    losses, cr, rr, ratio, log_odds = orpo_mod.ORPOTrainer.odds_ratio_loss(cfg, c, r)
    nll = _trl_nll(logits[:B], labels[:B])
    want = {
        "loss": float(nll - losses.mean()),
        "rewards/chosen": float(cr.mean()),
        "rewards/rejected": float(rr.mean()),
        "rewards/margins": float((cr - rr).mean()),
        "rewards/accuracies": float((cr > rr).float().mean()),
        "logps/chosen": float(c.mean()),
        "logps/rejected": float(r.mean()),
        "nll_loss": float(nll),
        "log_odds_ratio": float(ratio),
        "log_odds_chosen": float(log_odds),
    }
    loss, m = _ours(ORPO(beta=beta, convention="trl"), setup, setup["pairs"])
    assert loss == pytest.approx(want["loss"], rel=1e-5)
    _check(m, want, [k for k in want if k != "loss"])
    # ours: per-response token-mean NLL, averaged over pairs (the paper's L_SFT)
    ours, om = _ours(ORPO(beta=beta), setup, setup["pairs"])
    assert om["nll_loss"] == pytest.approx(float(-c.mean()), rel=1e-5)
    assert ours != pytest.approx(want["loss"], rel=1e-4)


def _trl_kto(lp, ref_lp, kl_lp, ref_kl_lp, labels, beta, dw, uw):
    """KTOTrainer._compute_loss (trl 1.16, loss_type="kto"), from summed completion log-probs."""
    kl = (kl_lp - ref_kl_lp).mean().detach().clamp(min=0)
    chosen_idx = torch.nonzero(labels, as_tuple=False).view(-1)
    rejected_idx = torch.nonzero(~labels, as_tuple=False).view(-1)
    chosen_logratios = lp.index_select(0, chosen_idx) - ref_lp.index_select(0, chosen_idx)
    rejected_logratios = lp.index_select(0, rejected_idx) - ref_lp.index_select(0, rejected_idx)
    chosen_losses = 1 - F.sigmoid(beta * (chosen_logratios - kl))
    rejected_losses = 1 - F.sigmoid(beta * (kl - rejected_logratios))
    losses = torch.cat((dw * chosen_losses, uw * rejected_losses), 0)
    rc, rr = (beta * chosen_logratios).mean(), (beta * rejected_logratios).mean()
    return {
        "loss": float(losses.nanmean()),
        "kl": float(kl),
        "rewards/chosen": float(rc),
        "rewards/rejected": float(rr),
        "rewards/margins": float(rc - rr),
        "logps/chosen": float(lp.index_select(0, chosen_idx).mean()),
        "logps/rejected": float(lp.index_select(0, rejected_idx).mean()),
    }


def test_kto_matches_trl(setup):
    rs = np.random.RandomState(3)
    batch = {**_rows(rs, 5, [3, 7, 5, 2, 6]), **_rows(rs, 5, [5, 3, 2, 7, 4], "kl_")}
    labels = np.asarray([1, 0, 1, 1, 0], np.float32)
    batch["label"] = labels
    seq = ("tokens", "positions", "segment_ids", "loss_mask")

    def sums(params, prefix):
        logits, lab = setup["logits_labels"](params, {k: batch[prefix + k] for k in seq})
        return cpo_mod.CPOTrainer.get_batch_logps(logits, lab)  # TRL's summed completion log-probs

    want = _trl_kto(
        sums(setup["policy"], ""),
        sums(setup["ref"], ""),
        sums(setup["policy"], "kl_"),
        sums(setup["ref"], "kl_"),
        torch.tensor(labels > 0.5),
        0.2,
        1.3,
        0.7,
    )
    loss, m = _ours(KTO(beta=0.2, desirable_weight=1.3, undesirable_weight=0.7), setup, batch, setup["ref"])
    assert loss == pytest.approx(want["loss"], rel=1e-5)
    _check(m, want, [k for k in want if k != "loss"])
