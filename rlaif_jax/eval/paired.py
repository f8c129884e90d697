"""Paired differences between two arms scored on the same instructions.

Two arms evaluated on one prompt set share each prompt's difficulty, so their difference
is estimated far more precisely from per-prompt differences than from two independent win
rates: for per-prompt scores a_i and b_i (both valid),

    diff = mean(a_i - b_i),   se = std(a_i - b_i, ddof=1) / sqrt(n),

the usual paired t statistic's numerator and denominator. Prompts where either side is
invalid (NaN, e.g. an unparseable judgment) are left out of both, never scored.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Mapping

import numpy as np


@dataclasses.dataclass(frozen=True)
class PairedDifference:
    diff: float  # mean of a - b, in the scores' units times `scale`
    se: float  # standard error of that mean (sample std, ddof=1)
    n: int  # prompts scored on both sides

    @property
    def z(self) -> float:
        """diff in units of its standard error (NaN when se is 0 or undefined)."""
        return self.diff / self.se if self.se and not math.isnan(self.se) else math.nan

    def as_dict(self) -> dict:
        return {"diff": self.diff, "se": self.se, "n": self.n, "z": self.z}

    def __str__(self) -> str:
        return f"{self.diff:+.1f} +- {self.se:.1f} (n={self.n})"


def paired_difference(a: Mapping[str, float], b: Mapping[str, float], scale: float = 100.0) -> PairedDifference:
    """a - b over the keys (prompt ids) both score; values are per-prompt scores (a win-rate
    preference in [0, 1], a task score, ...), NaN for invalid. `scale` = 100 reports points."""
    keys = [k for k in a if k in b and not math.isnan(a[k]) and not math.isnan(b[k])]
    if not keys:
        return PairedDifference(math.nan, math.nan, 0)
    d = np.asarray([a[k] - b[k] for k in keys], dtype=np.float64) * scale
    se = float(np.std(d, ddof=1) / math.sqrt(d.size)) if d.size > 1 else math.nan
    return PairedDifference(float(d.mean()), se, int(d.size))
