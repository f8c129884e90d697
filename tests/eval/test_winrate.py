import math

import numpy as np
import pytest

from rlaif_jax import winrate as W


def test_matches_alpaca_eval_reported_numbers():
    # alpaca_eval printed: win_rate 44.0, standard_error 4.988876515698589 for 44 wins / 56 losses.
    wr = W.win_rate([1.0] * 44 + [0.0] * 56)
    assert wr.win_rate == pytest.approx(44.0)
    assert wr.standard_error == pytest.approx(4.988876515698589, rel=1e-12)
    assert (wr.n_wins, wr.n_losses, wr.n_ties, wr.n_invalid) == (44, 56, 0, 0)


def test_ties_half_and_invalid_excluded():
    verdicts = ["first"] * 3 + ["second"] * 2 + ["tie"] * 2 + ["invalid"] * 3
    wr = W.verdict_win_rate(verdicts, policy_is="first")
    p = np.array([1, 1, 1, 0, 0, 0.5, 0.5])
    assert wr.win_rate == pytest.approx(100 * 4 / 7)
    # by hand: mean 4/7, sample var = sum((p - 4/7)^2) / 6
    var = (3 * (3 / 7) ** 2 + 2 * (4 / 7) ** 2 + 2 * (1 / 14) ** 2) / 6
    assert wr.standard_error == pytest.approx(100 * math.sqrt(var / 7))
    assert np.std(p, ddof=1) == pytest.approx(math.sqrt(var))
    assert (wr.n_wins, wr.n_losses, wr.n_ties, wr.n_invalid, wr.n_total, wr.n_scored) == (3, 2, 2, 3, 10, 7)


def test_invalid_never_a_win():
    # All-invalid: nothing scored, not 100% and not 0%.
    wr = W.verdict_win_rate(["invalid"] * 5)
    assert math.isnan(wr.win_rate) and wr.n_invalid == 5 and wr.n_wins == 0
    # Adding invalids to a run leaves the rate unchanged.
    a = W.verdict_win_rate(["first", "second", "second"])
    b = W.verdict_win_rate(["first", "second", "second", "invalid", "invalid"])
    assert a.win_rate == b.win_rate and a.standard_error == b.standard_error


def test_policy_second_flips():
    wr = W.verdict_win_rate(["first", "first", "second", "tie"], policy_is="second")
    assert wr.win_rate == pytest.approx(100 * 1.5 / 4)
    assert wr.n_wins == 1 and wr.n_losses == 2


def test_continuous_preferences():
    comps = [{"verdict": "first", "p_1": 0.9}, {"verdict": "second", "p_1": 0.2}, {"verdict": "invalid", "p_1": 0.7}]
    p = W.continuous_preferences(comps)
    np.testing.assert_allclose(p[:2], [0.9, 0.2])
    assert math.isnan(p[2])
    wr = W.win_rate(p)
    assert wr.win_rate == pytest.approx(55.0)
    assert wr.discrete_win_rate == pytest.approx(50.0)
    assert W.continuous_preferences([{"verdict": "first", "p_1": None}]) is None
    np.testing.assert_allclose(W.continuous_preferences(comps[:1], policy_is="second"), [0.1])


def test_bad_input():
    with pytest.raises(ValueError, match="verdict 1"):
        W.preferences_from_verdicts(["first", "b"])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        W.win_rate([1.2])
