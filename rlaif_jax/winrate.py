"""Win rates as AlpacaEval reports them (below feedback and eval: the critic statistics, the
gap audit and the evaluation all score verdicts with it).

A preference is P(policy output beats the reference) for one instruction: 1 for a win, 0
for a loss, 0.5 for a tie, or a value in between when the judge's logprobs give one (the
continuous / "weighted" protocol). Invalid judgments (unparseable answers, API errors) are
NaN: they are counted in `n_invalid` and left out of the mean and its denominator; they are
never scored as wins or losses.

Standard error, as alpaca_eval computes it (`metrics/helpers.py`,
`AbsoluteScoringRule.describe_head2head`): the standard error of the mean of the per-
instruction preferences with the sample standard deviation (pandas `Series.sem()`, ddof=1),
    se = std(p, ddof=1) / sqrt(n),
times 100 like the win rate. Ties enter as 0.5. E.g. 44 wins and 56 losses: win rate 44.0,
se = sqrt(.44 * .56 / 99) * 100 = 4.9889 (alpaca_eval prints 4.988876515698589).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Iterable, Optional, Sequence

import numpy as np

# Canonical-order verdicts (rlaif_jax.feedback.judge.VERDICTS) when the policy is response_1.
_POLICY_FIRST = {"first": 1.0, "second": 0.0, "tie": 0.5, "invalid": math.nan}


def preferences_from_verdicts(verdicts: Iterable[str], policy_is: str = "first") -> np.ndarray:
    """Per-instruction preference for the policy from un-swapped judge verdicts; `policy_is`
    says whether the policy was response_1 ("first") or response_2 ("second")."""
    if policy_is not in ("first", "second"):
        raise ValueError(f"policy_is must be 'first' or 'second', got {policy_is!r}")
    out = []
    for i, v in enumerate(verdicts):
        if v not in _POLICY_FIRST:
            raise ValueError(f"verdict {i}: {v!r} is not one of {sorted(_POLICY_FIRST)}")
        p = _POLICY_FIRST[v]
        out.append(1.0 - p if policy_is == "second" and not math.isnan(p) else p)
    return np.asarray(out, dtype=np.float64)


@dataclasses.dataclass(frozen=True)
class WinRate:
    win_rate: float  # percent; NaN when nothing was scored
    standard_error: float  # percent
    n_wins: int
    n_losses: int
    n_ties: int
    n_invalid: int
    n_total: int
    discrete_win_rate: float  # percent, preferences rounded to win / tie / loss first

    @property
    def n_scored(self) -> int:
        return self.n_total - self.n_invalid

    def as_dict(self) -> dict:
        return dataclasses.asdict(self) | {"n_scored": self.n_scored}

    def __str__(self) -> str:
        return (
            f"{self.win_rate:.2f} +- {self.standard_error:.2f} "
            f"(W/L/T {self.n_wins}/{self.n_losses}/{self.n_ties}, invalid {self.n_invalid})"
        )


def _mean_se(p: np.ndarray) -> tuple[float, float]:
    if p.size == 0:
        return math.nan, math.nan
    se = float(np.std(p, ddof=1) / math.sqrt(p.size)) if p.size > 1 else math.nan
    return float(np.mean(p)) * 100.0, se * 100.0


def win_rate(preferences: Sequence[float]) -> WinRate:
    """Win rate +- standard error of per-instruction preferences in [0, 1] (NaN = invalid)."""
    p = np.asarray(preferences, dtype=np.float64)
    if p.ndim != 1:
        raise ValueError(f"preferences must be 1-D, got shape {p.shape}")
    valid = ~np.isnan(p)
    q = p[valid]
    if np.any((q < 0) | (q > 1)):
        raise ValueError("preferences must lie in [0, 1]")
    wr, se = _mean_se(q)
    discrete = np.where(q > 0.5, 1.0, np.where(q < 0.5, 0.0, 0.5))
    return WinRate(
        win_rate=wr,
        standard_error=se,
        n_wins=int(np.sum(q > 0.5)),
        n_losses=int(np.sum(q < 0.5)),
        n_ties=int(np.sum(q == 0.5)),
        n_invalid=int(np.sum(~valid)),
        n_total=int(p.size),
        discrete_win_rate=_mean_se(discrete)[0],
    )


def verdict_win_rate(verdicts: Iterable[str], policy_is: str = "first") -> WinRate:
    return win_rate(preferences_from_verdicts(verdicts, policy_is))


def continuous_preferences(comparisons: Sequence[dict], policy_is: str = "first") -> Optional[np.ndarray]:
    """Logprob-weighted preferences (the judge's P(policy wins)) from comparison dicts'
    `p_1`, where every valid comparison has one; else None. An invalid verdict stays NaN
    even when p_1 exists, so the two protocols score the same set of instructions."""
    out = []
    for c in comparisons:
        if c["verdict"] == "invalid":
            out.append(math.nan)
            continue
        p1 = c.get("p_1")
        if p1 is None:
            return None
        out.append(p1 if policy_is == "first" else 1.0 - p1)
    return np.asarray(out, dtype=np.float64)
