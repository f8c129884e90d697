"""The LC GLM recovers a planted length effect on synthetic judgments."""

import numpy as np
import pytest

from rlaif_jax.eval import length_control as LC
from rlaif_jax.winrate import win_rate


def _sigmoid(z):
    return 1 / (1 + np.exp(-z))


def _simulate(rng, n, theta, phi, psi, gamma, mean_extra_len):
    ref = rng.integers(200, 1500, n).astype(float)
    model = np.maximum(1.0, ref + rng.normal(mean_extra_len, 400, n))
    feat = LC.length_feature(model, ref)
    p = _sigmoid(theta + phi * feat + psi * gamma)
    y = (rng.random(n) < p).astype(float)
    true_lc = 100 * np.mean(_sigmoid(theta + psi * gamma))
    return y, model, ref, true_lc


def test_fit_logistic_matches_known_coefficients():
    rng = np.random.default_rng(0)
    X = np.column_stack([np.ones(20000), rng.normal(size=20000)])
    y = (rng.random(20000) < _sigmoid(X @ np.array([-0.5, 1.2]))).astype(float)
    b = LC.fit_logistic(X, y, l2=0.0)
    np.testing.assert_allclose(b, [-0.5, 1.2], atol=0.06)
    # Soft labels: the MLE equals the generating coefficients exactly.
    b_soft = LC.fit_logistic(X, _sigmoid(X @ np.array([-0.5, 1.2])), l2=0.0)
    np.testing.assert_allclose(b_soft, [-0.5, 1.2], atol=1e-6)


def test_recovers_planted_length_effect_with_known_difficulty():
    rng = np.random.default_rng(1)
    n = 4000
    gamma = rng.normal(size=n)
    y, lm, lr, true_lc = _simulate(rng, n, theta=-0.4, phi=1.5, psi=1.0, gamma=gamma, mean_extra_len=500)
    raw = win_rate(y).win_rate
    assert raw - true_lc > 10  # the judge's length bias inflates the raw rate by > 10 points
    out = LC.length_controlled_win_rate(y, lm, lr, difficulty=gamma, n_bootstrap=50)
    assert abs(out["lc_win_rate"] - true_lc) < 2.0, (out, true_lc)
    assert out["coef"]["length"] == pytest.approx(1.5, abs=0.3)
    assert 0.3 < out["lc_standard_error"] < 2.0


def test_single_run_without_difficulty():
    rng = np.random.default_rng(2)
    n = 4000
    y, lm, lr, true_lc = _simulate(rng, n, theta=0.3, phi=1.0, psi=0.0, gamma=np.zeros(n), mean_extra_len=-400)
    raw = win_rate(y).win_rate
    assert true_lc - raw > 8  # shorter outputs and a judge that likes length: raw understates
    out = LC.length_controlled_win_rate(y, lm, lr)
    assert abs(out["lc_win_rate"] - true_lc) < 2.0, (out, true_lc)
    # No length difference at all: LC equals the raw rate.
    eq = LC.length_controlled_win_rate(y, lr, lr)
    assert eq["lc_win_rate"] == pytest.approx(raw, abs=0.1)


def test_joint_difficulty_across_runs():
    rng = np.random.default_rng(3)
    n, thetas, phis, extras = 805, [-0.8, 0.0, 0.6, 1.0], [1.5, 1.0, 1.2, 0.8], [400, -300, 200, 500]
    gamma = rng.normal(0, 1.2, n)
    ref = rng.integers(200, 1500, n).astype(float)  # one reference set for every run
    P, LM, truths = [], [], []
    for th, ph, ex in zip(thetas, phis, extras):
        lm = np.maximum(1.0, ref + rng.normal(ex, 400, n))
        p = _sigmoid(th + ph * LC.length_feature(lm, ref) - gamma)  # gamma: difficulty
        P.append((rng.random(n) < p).astype(float))
        LM.append(lm)
        truths.append(100 * np.mean(_sigmoid(th - gamma)))
    P, LM = np.array(P), np.array(LM)
    P[0, :20] = np.nan  # invalid judgments are skipped
    g_hat = LC.estimate_instruction_difficulty(P, LM, ref)
    assert np.corrcoef(g_hat, gamma)[0, 1] > 0.5
    errs_joint, errs_none = [], []
    for i in range(len(thetas)):
        with_d = LC.length_controlled_win_rate(P[i], LM[i], ref, difficulty=g_hat)
        without = LC.length_controlled_win_rate(P[i], LM[i], ref)
        errs_joint.append(abs(with_d["lc_win_rate"] - truths[i]))
        errs_none.append(abs(without["lc_win_rate"] - truths[i]))
    assert max(errs_joint) < 4.0, (errs_joint, truths)
    # The jointly estimated difficulty term helps on average.
    assert np.mean(errs_joint) < np.mean(errs_none)


def _write_judgments(d, ids, pol_len, ref_len, verdicts):
    import json

    d.mkdir()
    with open(d / "judgments.jsonl", "w") as f:
        for pid, a, b, v in zip(ids, pol_len, ref_len, verdicts):
            f.write(
                json.dumps({"prompt_id": pid, "response_1": "x" * int(a), "response_2": "y" * int(b), "verdict": v})
                + "\n"
            )
    (d / "metrics.json").write_text("{}")


def test_joint_length_control_over_run_directories(tmp_path):
    from rlaif_jax.eval.report import joint_length_control

    rng = np.random.default_rng(5)
    n = 805
    ids = [f"p{i}" for i in range(n)]
    gamma = rng.normal(0, 1.2, n)
    ref = rng.integers(200, 1500, n).astype(float)
    dirs, P, LM, truths = [], [], [], []
    for k, (th, ph, ex) in enumerate([(-0.5, 1.5, 400), (0.4, 1.0, -300), (1.0, 1.2, 300)]):
        lm = np.maximum(1.0, np.round(ref + rng.normal(ex, 400, n)))
        y = (rng.random(n) < _sigmoid(th + ph * LC.length_feature(lm, ref) - gamma)).astype(float)
        verdicts = ["first" if v else "second" for v in y]
        verdicts[k] = "invalid"
        y[k] = np.nan
        _write_judgments(tmp_path / f"run{k}", ids, lm, ref, verdicts)
        dirs.append(str(tmp_path / f"run{k}"))
        P.append(y), LM.append(lm), truths.append(100 * np.mean(_sigmoid(th - gamma)))
    got = joint_length_control(dirs)
    g = LC.estimate_instruction_difficulty(np.array(P), np.array(LM), ref)
    for i, d in enumerate(dirs):
        direct = LC.length_controlled_win_rate(P[i], LM[i], ref, difficulty=g)["lc_win_rate"]
        assert got[d] == pytest.approx(direct, abs=1e-9)
        # Accuracy is tested above; here only a sanity bound (805 instructions: LC SE ~1.7).
        assert abs(got[d] - truths[i]) < 6.0, (got[d], truths[i])
    assert joint_length_control(dirs[:1]) == {}  # one run: nothing to estimate difficulty from
    _write_judgments(tmp_path / "other_ref", ids, LM[0], ref + 1, ["first"] * n)
    with pytest.raises(ValueError, match="different references"):
        joint_length_control(dirs + [str(tmp_path / "other_ref")])
