import importlib.util
import os

import numpy as np
import pytest

_PATH = os.path.join(os.path.dirname(__file__), "..", "..", "tools", "miniature_reward_check.py")
_spec = importlib.util.spec_from_file_location("miniature_reward_check", _PATH)
mrc = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(mrc)


def test_spearman_matches_the_rank_formula():
    assert mrc.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert mrc.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # No ties: 1 - 6 sum d^2 / (n (n^2 - 1)); ranks of b are 2,1,4,3 -> sum d^2 = 4
    assert mrc.spearman([0.1, 0.5, 0.7, 0.9], [5, 1, 9, 8]) == pytest.approx(1 - 6 * 4 / (4 * 15))
    # Ties share their mean rank (Pearson on mid-ranks, as scipy.stats.spearmanr)
    a, b = [1, 1, 2, 3], [1, 2, 2, 3]
    ra, rb = np.array([0.5, 0.5, 2, 3]), np.array([0, 1.5, 1.5, 3])
    assert mrc.spearman(a, b) == pytest.approx(np.corrcoef(ra, rb)[0, 1])


def test_pair_agreement_counts_only_pairs_whose_truth_differs():
    # Prompt 0: truths 1 > 0 = 0: pairs (0,1), (0,2) count; reward ranks (0,1) right, (0,2) wrong.
    # Prompt 1: truths 0 < 1, 0 < 2... (0,1), (0,2), (1,2) count; reward ranks all three right.
    rewards = [[0.9, 0.1, 1.5], [0.0, 0.5, 0.7]]
    truths = [[1, 0, 0], [0, 1, 2]]
    assert mrc.pair_agreement(rewards, truths) == (5, pytest.approx(4 / 5))
    assert mrc.pair_agreement([[1, 2]], [[1, 1]])[0] == 0


def test_pair_agreement_by_group_splits_the_prompts():
    rewards = [[0.9, 0.1, 1.5], [0.0, 0.5, 0.7], [1.0, 0.0, 0.0]]
    truths = [[1, 0, 0], [0, 1, 2], [0, 1, 1]]
    got = mrc.pair_agreement_by_group(rewards, truths, ["sort", "count", "sort"])
    assert list(got) == ["count", "sort"]
    assert got["count"] == (3, pytest.approx(1.0))
    assert got["sort"] == (4, pytest.approx(1 / 4))  # prompt 0: 1 of 2 right; prompt 2: 0 of 2
