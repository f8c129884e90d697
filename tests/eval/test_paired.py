"""Paired differences against the closed form, with invalid prompts left out of both sides."""

import math

import numpy as np
import pytest

from rlaif_jax.eval.paired import paired_difference


def test_paired_difference_is_the_mean_and_sem_of_per_prompt_differences():
    a = {"p1": 1.0, "p2": 0.5, "p3": 0.0, "p4": 1.0, "p5": math.nan, "only_a": 1.0}
    b = {"p1": 0.0, "p2": 0.5, "p3": 0.0, "p4": 0.0, "p5": 1.0, "only_b": 0.0}
    d = paired_difference(a, b)
    diffs = np.array([1.0, 0.0, 0.0, 1.0]) * 100
    assert d.n == 4
    assert d.diff == pytest.approx(diffs.mean())
    assert d.se == pytest.approx(diffs.std(ddof=1) / 2)
    assert d.z == pytest.approx(d.diff / d.se)
    # Pairing removes the shared per-prompt difficulty: identical arms differ by exactly 0.
    same = paired_difference(a, a)
    assert same.diff == 0.0 and same.se == 0.0 and math.isnan(same.z)
    assert paired_difference({}, b).n == 0
