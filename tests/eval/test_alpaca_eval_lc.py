"""The alpaca_eval mode of the LC win rate against alpaca_eval 0.6.6 itself: fixtures made
with it (tests/eval/fixtures/alpaca_eval_lc/make_fixtures.py), and, where alpaca_eval is
installed, alpaca_eval run live on the same inputs."""

import json
import math
import os

import numpy as np
import pytest

from rlaif_jax.eval import alpaca_eval_lc as A
from rlaif_jax.eval.length_control import length_controlled_win_rate

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "alpaca_eval_lc")
CASES = ("minimal_discrete", "minimal_all_zero", "noreg_difficulty", "v1_gamed", "v1_continuous")


def _load(name):
    with open(os.path.join(FIXTURES, f"{name}.json")) as f:
        c = json.load(f)
    prefs = [math.nan if p is None else p for p in c["preferences"]]
    gamed = os.path.join(FIXTURES, c["df_gamed"]) if c["df_gamed"] else None
    return c, prefs, gamed


def _ours(c, prefs, gamed, solver="newton"):
    return A.alpaca_eval_lc_win_rate(prefs, c["len_model"], c["len_ref"], glm=c["glm"], df_gamed=gamed, solver=solver)


@pytest.mark.parametrize("name", CASES)
def test_newton_matches_alpaca_eval_fixture(name):
    c, prefs, gamed = _load(name)
    out, exp = _ours(c, prefs, gamed), c["expected"]
    # same C from the cross-validation; liblinear's looser stopping rule is all that differs
    assert out["C"] == pytest.approx(exp["C"], rel=1e-12)
    assert out["lc_win_rate"] == pytest.approx(exp["metrics"]["length_controlled_winrate"], abs=5e-3)
    assert out["lc_prediction_standard_error"] == pytest.approx(exp["metrics"]["lc_standard_error"], abs=1e-4)
    names = {
        "np.tanh(std_delta_len)": "length",
        "instruction_difficulty": "difficulty",
        "not_gamed_baseline.astype(float)": "model",
    }
    assert {names[k]: v for k, v in exp["weights"].items()} == pytest.approx(out["coef"], abs=2e-4)
    assert out["n_total"] == len(prefs) and out["n"] == sum(not math.isnan(p) for p in prefs)


def test_l1_penalty_can_zero_everything():
    # raw win rate 57.9, but cross-validation picks C = 1e-4 and the L1 penalty zeroes every
    # coefficient: alpaca_eval reports exactly 50.0 (our GLM does not)
    c, prefs, gamed = _load("minimal_all_zero")
    out = _ours(c, prefs, gamed)
    assert out["lc_win_rate"] == 50.0 and out["coef"] == {"model": 0.0, "length": 0.0}
    assert c["expected"]["metrics"]["win_rate"] == pytest.approx(57.894736842)
    assert length_controlled_win_rate(prefs, c["len_model"], c["len_ref"])["lc_win_rate"] != pytest.approx(50.0, abs=1)


@pytest.mark.parametrize("name", CASES)
def test_liblinear_solver_is_bit_identical(name):
    pytest.importorskip("sklearn", reason="solver='liblinear' needs scikit-learn (the alpaca-eval extra)")
    c, prefs, gamed = _load(name)
    out = _ours(c, prefs, gamed, solver="liblinear")
    assert out["lc_win_rate"] == c["expected"]["metrics"]["length_controlled_winrate"]
    assert out["lc_prediction_standard_error"] == pytest.approx(
        c["expected"]["metrics"]["lc_standard_error"], rel=1e-12, abs=1e-14
    )


def test_invalid_rows_scale_lengths_and_enter_the_average():
    """alpaca_eval keeps invalid judgments in the length scale and the average over
    instructions; dropping them first (as our GLM does) gives another number."""
    c, prefs, gamed = _load("noreg_difficulty")
    ok = [i for i, p in enumerate(prefs) if not math.isnan(p)]
    full = _ours(c, prefs, gamed)
    assert full["n"] < full["n_total"]
    gamma = np.asarray([A.load_df_gamed(gamed)["difficulty"][i] for i in range(len(prefs))])
    pred = 1 / (1 + np.exp(-(full["coef"]["model"] + full["coef"]["difficulty"] * gamma)))
    assert full["lc_win_rate"] == pytest.approx(100 * pred.mean(), rel=1e-12)
    assert full["lc_win_rate"] != pytest.approx(100 * pred[ok].mean(), abs=1e-6)


def test_errors_name_what_is_missing(tmp_path):
    c, prefs, _ = _load("v1_gamed")
    with pytest.raises(ValueError, match="df_gamed.csv"):
        A.alpaca_eval_lc_win_rate(prefs, c["len_model"], c["len_ref"], glm="length_controlled_v1")
    with pytest.raises(ValueError, match="difficulty_file"):
        A.alpaca_eval_lc_win_rate(prefs, c["len_model"], c["len_ref"], glm="length_controlled_noreg")
    short = tmp_path / "instruction_difficulty.csv"
    short.write_text("index,instruction_difficulty\n0,0.1\n1,-0.2\n")
    with pytest.raises(
        A.AlpacaEvalDataError, match=r"instruction_difficulty.csv: no difficulty for instruction\(s\) \[2"
    ):
        A.alpaca_eval_lc_win_rate(
            prefs, c["len_model"], c["len_ref"], glm="length_controlled_noreg", difficulty_file=str(short)
        )
    bad = tmp_path / "df_gamed.csv"
    bad.write_text("model,preference\nx,1\n")
    with pytest.raises(A.AlpacaEvalDataError, match=r"df_gamed.csv: no column\(s\)"):
        A.alpaca_eval_lc_win_rate(prefs, c["len_model"], c["len_ref"], df_gamed=str(bad))


def test_instruction_difficulty_csv_equals_df_gamed(tmp_path):
    c, prefs, gamed = _load("noreg_difficulty")
    table = A.load_df_gamed(gamed)["difficulty"]
    path = tmp_path / "instruction_difficulty.csv"
    path.write_text("index,instruction_difficulty\n" + "".join(f"{i},{v!r}\n" for i, v in table.items()))
    a = A.alpaca_eval_lc_win_rate(
        prefs, c["len_model"], c["len_ref"], glm="length_controlled_noreg", difficulty_file=str(path)
    )
    b = _ours(c, prefs, gamed)
    assert a["lc_win_rate"] == b["lc_win_rate"]


def test_group_kfold_matches_sklearn():
    sk = pytest.importorskip("sklearn.model_selection", reason="compares with scikit-learn's GroupKFold")
    n = 23
    groups = np.tile(np.arange(n), 2)
    want = np.zeros(2 * n, int)
    for k, (_, te) in enumerate(sk.GroupKFold(n_splits=5).split(np.zeros((2 * n, 1)), groups=groups)):
        want[te] = k
    assert np.array_equal(np.tile(A.group_kfold(n), 2), want)


def _synthetic_set(seed, n=805):
    """An 805-instruction annotation set as alpaca_eval's fit sees it: [tanh(length), (difficulty,)
    model] columns, half the preferences hard 0/1 and half soft (logprob-weighted judges)."""
    r = np.random.default_rng(seed)
    lm, lr = r.integers(200, 3000, n).astype(float), r.integers(200, 3000, n).astype(float)
    gamma = r.normal(0, 1, n)
    z = 0.3 + 0.8 * np.tanh((lm - lr) / 1000) + 0.5 * gamma * (seed % 2) + r.normal(0, 1, n)
    p = 1 / (1 + np.exp(-z))
    p = np.where(r.random(n) < 0.5, np.round(p), p)
    delta = lr - lm
    feat = np.tanh(delta / np.std(delta, ddof=1))
    cols = [feat, gamma, np.ones(n)] if seed % 2 else [feat, np.ones(n)]
    return np.stack(cols, 1), p, np.ones(n)


def _alpaca_eval_fit(X, y, w):
    """alpaca_eval 0.6.6's fit_LogisticRegressionCV(is_ytrue_proba=True) on numpy arrays: the same
    scikit-learn estimator, arguments, scorer and metadata routing (its pandas frames aside)."""
    import sklearn
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.metrics import make_scorer
    from sklearn.model_selection import GroupKFold

    def logloss_continuous(y_true, y_pred, true_prob, true_sample_weight=None):
        y_true = np.where(y_true == 1, true_prob, 1 - true_prob)
        y_pred = np.clip(y_pred, 1e-15, 1 - 1e-15)
        return -np.mean((y_true * np.log(y_pred) + (1 - y_true) * np.log(1 - y_pred)) * true_sample_weight)

    m = len(y)
    true_prob, true_w = np.r_[y, 1 - y], np.r_[w, w]
    with sklearn.config_context(enable_metadata_routing=True):
        scorer = make_scorer(logloss_continuous, response_method="predict_proba", greater_is_better=False)
        scorer = scorer.set_score_request(true_sample_weight=True, true_prob=True)
        model = LogisticRegressionCV(
            cv=GroupKFold(n_splits=5),
            scoring=scorer,
            random_state=123,
            dual=False,
            penalty="l1",
            solver="liblinear",
            fit_intercept=False,
        )
        model.set_fit_request(sample_weight=True)
        model.fit(
            np.concatenate([X, X]),
            np.r_[np.ones(m), np.zeros(m)],
            sample_weight=true_prob * true_w,
            groups=np.r_[np.arange(m), np.arange(m)],
            true_sample_weight=true_w,
            true_prob=true_prob,
        )
    return model.coef_[0], float(model.C_[0])


# Sets where a fresh liblinear seed for every C (instead of scikit-learn's one generator per fold)
# chose another C: 1291.5 -> 1e4, 21.5 -> 2.78, 1291.5 -> 166.8.
@pytest.mark.parametrize("seed", [1, 2, 10])
@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")
def test_liblinear_c_choice_follows_sklearns_seeding(seed):
    pytest.importorskip("sklearn", reason="compares with scikit-learn's LogisticRegressionCV")
    X, y, w = _synthetic_set(seed)
    want_coef, want_C = _alpaca_eval_fit(X, y, w)
    coef, C = A.fit_cv(X, y, w, solver="liblinear")
    assert C == want_C
    assert np.array_equal(coef, want_coef)


def test_live_alpaca_eval(monkeypatch):
    """alpaca_eval itself on one fixture's inputs (its df_gamed.csv download patched to the
    synthetic file): needs alpaca_eval, which imports pkg_resources (setuptools < 81)."""
    pytest.importorskip("pkg_resources", reason="alpaca_eval needs setuptools < 81 (pkg_resources)")
    glm_winrate = pytest.importorskip("alpaca_eval.metrics.glm_winrate", reason="pip install -e '.[alpaca-eval]'")
    import pandas as pd

    c, prefs, gamed = _load("v1_gamed")
    monkeypatch.setattr(glm_winrate, "hf_hub_download", lambda **kw: gamed)
    df = pd.DataFrame(
        [
            {
                "preference": p + 1.0,
                "output_1": "r" * lr,
                "output_2": "m" * lm,
                "generator_1": "ref",
                "generator_2": "policy",
                "annotator": "synthetic",
            }
            for p, lm, lr in zip(prefs, c["len_model"], c["len_ref"])
        ]
    )
    theirs = glm_winrate.get_length_controlled_winrate(
        df, glm_name=c["glm"], save_weights_dir=None, is_warn_extreme_changes=False
    )
    out = _ours(c, prefs, gamed, solver="liblinear")
    assert out["lc_win_rate"] == theirs["length_controlled_winrate"]
    assert out["lc_prediction_standard_error"] == pytest.approx(theirs["lc_standard_error"], rel=1e-12)


def test_judge_metrics_names_each_se_for_what_it_is():
    from rlaif_jax.eval.evaluate import judge_metrics

    c, prefs, _ = _load("minimal_discrete")
    verdict = {1.0: "first", 0.0: "second", 0.5: "tie"}
    comps = [{"verdict": "invalid" if math.isnan(p) else verdict[p]} for p in prefs]
    outs, refs = ["m" * n for n in c["len_model"]], ["r" * n for n in c["len_ref"]]
    ours = judge_metrics(comps, outs, refs, lc_bootstrap=5)
    assert ours["lc_method"] == "glm" and ours["lc_bootstrap_standard_error"] > 0
    assert "lc_standard_error" not in ours and "lc_prediction_standard_error" not in ours
    ae = judge_metrics(comps, outs, refs, lc_method="alpaca_eval", alpaca_eval_lc={"glm": c["glm"]})
    assert ae["lc_method"] == "alpaca_eval" and "lc_bootstrap_standard_error" not in ae
    assert ae["lc_win_rate"] == pytest.approx(c["expected"]["metrics"]["length_controlled_winrate"], abs=5e-3)
    assert ae["win_rate"] == pytest.approx(c["expected"]["metrics"]["win_rate"], rel=1e-12)
    with pytest.raises(ValueError, match="lc_method"):
        judge_metrics(comps, outs, refs, lc_method="alpaca")
