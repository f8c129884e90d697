"""The paper's three findings, tested on the miniature's evaluation as paired differences
between arms on the same held-out prompts (rlaif_jax.eval.paired), with the thresholds the
miniature is held to:

  1   SFT(weak 10%) + DPO beats SFT(weak 10%): >= 3 SE on win rate and >= 3 task points
  1b  SFT(weak 10%) + PPO beats SFT(weak 10%): > 0 on task score and >= 2 SE on win rate
  2   SFT(strong 100%) is not below SFT(weak 10%) + DPO by more than 1 SE (win rate)
  3   the DPO gain on SFT(strong 10%) is less than half the DPO gain on SFT(weak 10%)
      (win rate)

A finding whose arms were not run is left out.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Mapping

from rlaif_jax.eval.paired import PairedDifference, paired_difference


@dataclasses.dataclass(frozen=True)
class Finding:
    key: str
    claim: str
    difference: str  # which arm minus which
    criterion: str
    win: PairedDifference  # on the judge's win rate vs the reference, points
    task: PairedDifference  # on the world's true task score, points
    holds: bool


def _diff(per_prompt: Mapping[str, dict], a: str, b: str) -> tuple[PairedDifference, PairedDifference]:
    return (
        paired_difference(per_prompt[a]["win"], per_prompt[b]["win"]),
        paired_difference(per_prompt[a]["task"], per_prompt[b]["task"]),
    )


def _ge(x: float, y: float) -> bool:
    return not math.isnan(x) and not math.isnan(y) and x >= y


def findings(per_prompt: Mapping[str, dict]) -> list[Finding]:
    """per_prompt: arm -> {"win": {prompt_id: preference in [0, 1] or NaN}, "task": {prompt_id:
    score in [0, 1]}}. Returns the findings whose arms are all present."""
    have = set(per_prompt)
    out = []
    dpo = None
    if {"dpo_weak_10", "sft_weak_10"} <= have:
        w, t = dpo = _diff(per_prompt, "dpo_weak_10", "sft_weak_10")
        out.append(
            Finding(
                "1",
                "RL (DPO) on critic preferences improves SFT on the weaker teacher",
                "SFT weak 10% + DPO minus SFT weak 10%",
                "win >= 3 SE and task >= 3 points",
                w,
                t,
                _ge(w.diff, 3 * w.se) and _ge(t.diff, 3.0),
            )
        )
    if {"ppo_weak_10", "sft_weak_10"} <= have:
        w, t = _diff(per_prompt, "ppo_weak_10", "sft_weak_10")
        out.append(
            Finding(
                "1b",
                "RL (reward model + PPO) on critic preferences improves SFT on the weaker teacher",
                "SFT weak 10% + PPO minus SFT weak 10%",
                "task > 0 and win >= 2 SE",
                w,
                t,
                _ge(w.diff, 2 * w.se) and t.diff > 0,
            )
        )
    if {"sft_strong_100", "dpo_weak_10"} <= have:
        w, t = _diff(per_prompt, "sft_strong_100", "dpo_weak_10")
        out.append(
            Finding(
                "2",
                "SFT on a teacher as strong as the critic matches or beats SFT(weak) + RL",
                "SFT strong 100% minus SFT weak 10% + DPO",
                "win >= -1 SE",
                w,
                t,
                _ge(w.diff, -w.se),
            )
        )
    if dpo is not None and {"dpo_strong_10", "sft_strong_10"} <= have:
        w, t = _diff(per_prompt, "dpo_strong_10", "sft_strong_10")
        out.append(
            Finding(
                "3",
                "the RL gain shrinks when the SFT teacher is already as strong as the critic",
                "SFT strong 10% + DPO minus SFT strong 10%",
                "win < half of finding 1's win gain",
                w,
                t,
                not math.isnan(w.diff) and w.diff < 0.5 * dpo[0].diff,
            )
        )
    return out


def flatten(found: list[Finding]) -> dict:
    """summary.json keys: finding/<key>/{win,task}_{diff,se}, finding/<key>/holds."""
    out = {}
    for f in found:
        for name, d in (("win", f.win), ("task", f.task)):
            out[f"finding/{f.key}/{name}_diff"] = d.diff
            out[f"finding/{f.key}/{name}_se"] = d.se
        out[f"finding/{f.key}/n"] = f.win.n
        out[f"finding/{f.key}/holds"] = f.holds
    return out


def markdown(found: list[Finding]) -> str:
    lines = [
        "The paper's findings, as paired differences on the same eval prompts (points, +- SE):",
        "",
        "| finding | difference | win rate | task score | criterion | holds |",
        "|---|---|---|---|---|---|",
    ]
    for f in found:
        lines.append(
            f"| {f.key}: {f.claim} | {f.difference} | {f.win.diff:+.1f} +- {f.win.se:.1f} | "
            f"{f.task.diff:+.1f} +- {f.task.se:.1f} | {f.criterion} | "
            f"{'yes' if f.holds else 'NO'} |"
        )
    return "\n".join(lines)
