"""Iterative (online) RLAIF: what a round is, and how its preference pairs are made.

The paper's RLAIF is one round: the SFT policy samples once, the critic judges each sample
against the teacher's completion, DPO trains on the pairs. Iterating re-samples from the
improved policy and asks the critic again, so the pairs follow the policy (RL can only
reweight what the policy samples). Each round r:

  samples (n per prompt, from round r-1's policy; round 1: the SFT policy)
    -> critic (the pairing's comparisons) -> preferences -> DPO from round r-1's policy

with the DPO reference the SFT model or round r-1's policy (`reference`). Pairings:
  teacher     every sample vs the teacher's completion (the paper's pairs)
  best_worst  the n samples judged against each other (every pair, both judged once);
              per prompt the sample with the most wins is chosen over the one with the
              fewest, prompts whose samples all tie give no pair
  mix         both sets of pairs, trained on together

The pipeline (rlaif_jax.pipeline) walks a round's steps as stages named `round<r>/<step>`
in the step's own gin scope; this module holds what a round is and how its pairs are made.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import os
from typing import Iterable, Mapping, Optional, Sequence

import gin

from rlaif_jax import fileio
from rlaif_jax.data.records import COMPARISONS, write_records
from rlaif_jax.errors import ConfigError
from rlaif_jax.feedback.stages import comparison_record, load_comparisons

PAIRINGS = ("teacher", "best_worst", "mix")
REFERENCES = ("sft", "previous")
# A verdict on (response_1, response_2) -> the wins each gets.
WINS = {"first": (1.0, 0.0), "second": (0.0, 1.0), "tie": (0.5, 0.5)}


@gin.configurable
@dataclasses.dataclass(frozen=True)
class IterativeSettings:
    """rounds: DPO rounds (1 is the paper's RLAIF). pairing: PAIRINGS. reference: the DPO
    reference from round 2 on: 'sft' the SFT model throughout, 'previous' round r-1's policy
    (round 1's is the SFT model either way). samples: policy samples per prompt and round
    (best_worst needs >= 2). evaluate_rounds: evaluate every round's policy, not only the last."""

    rounds: int = 3
    pairing: str = "teacher"
    reference: str = "sft"
    samples: int = 2
    evaluate_rounds: bool = True

    def __post_init__(self):
        if not isinstance(self.rounds, int) or self.rounds <= 0:
            raise ConfigError(f"IterativeSettings.rounds must be a whole number > 0, got {self.rounds!r}")
        if self.pairing not in PAIRINGS:
            raise ConfigError(f"IterativeSettings.pairing must be one of {PAIRINGS}, got {self.pairing!r}")
        if self.reference not in REFERENCES:
            raise ConfigError(f"IterativeSettings.reference must be one of {REFERENCES}, got {self.reference!r}")
        if not isinstance(self.samples, int) or self.samples <= 0:
            raise ConfigError(f"IterativeSettings.samples must be a whole number > 0, got {self.samples!r}")
        if self.pairing != "teacher" and self.samples < 2:
            raise ConfigError(
                f"IterativeSettings.pairing {self.pairing!r} compares policy samples with each other: "
                f"IterativeSettings.samples must be >= 2, got {self.samples}"
            )

    @property
    def judges_teacher(self) -> bool:
        return self.pairing in ("teacher", "mix")

    @property
    def judges_samples(self) -> bool:
        return self.pairing in ("best_worst", "mix")

    def sample_pairs(self) -> list[tuple[int, int]]:
        """The (i, j) sample pairs the critic judges for best-vs-worst (i < j)."""
        return list(itertools.combinations(range(self.samples), 2)) if self.judges_samples else []

    def reference_round(self, r: int) -> int:
        """The round whose policy is round r's DPO reference (0: the SFT model)."""
        return 0 if self.reference == "sft" else r - 1


def comparison_sets(
    it: IterativeSettings, samples: Sequence[str], teacher: str, comparisons_dir: str
) -> list[tuple[str, str, str]]:
    """Every critic judgment a round's pairing needs.

    Args:
      it: the rounds' settings (pairing, samples per prompt).
      samples: the round's policy sample sets, one per sample index.
      teacher: the teacher's completions of the same prompts.
      comparisons_dir: the round's comparisons directory.

    Returns:
      (responses_1, responses_2, out_dir) per judgment: `teacher-<k>` sample k vs the
      teacher, `samples-<i>-<j>` sample i vs sample j.
    """
    sets = []
    if it.judges_teacher:
        sets += [(samples[k], teacher, os.path.join(comparisons_dir, f"teacher-{k}")) for k in range(it.samples)]
    sets += [(samples[i], samples[j], os.path.join(comparisons_dir, f"samples-{i}-{j}")) for i, j in it.sample_pairs()]
    return sets


def preference_sources(it: IterativeSettings, comparisons_dir: str) -> list[str]:
    """The comparison sets a round's preference pairs come from (comparison_sets'
    teacher-<k>, and best_worst made from the samples-<i>-<j>)."""
    out = [os.path.join(comparisons_dir, f"teacher-{k}") for k in range(it.samples)] if it.judges_teacher else []
    return out + ([os.path.join(comparisons_dir, "best_worst")] if it.judges_samples else [])


def best_vs_worst(comparisons: Iterable[Mapping], judge: Optional[str] = None) -> tuple[list[dict], dict]:
    """Per prompt, the critic's verdicts on pairs of policy samples -> one comparison of its
    best sample (most wins, ties half) over its worst (fewest), verdict 'first'.

    Args:
      comparisons: critic comparisons of samples of the same prompts (response_1 vs
        response_2; model_1 / model_2 name the samples); invalid verdicts are left out.
      judge: the judge name the result carries (default: the comparisons').

    Returns:
      (comparisons in the critic's record format, report): prompts in first-seen order;
      a prompt whose samples tie on wins (or were never validly judged) gives none, and
      equal wins are broken towards the sample named first (deterministic).
    """
    wins: dict = collections.defaultdict(dict)  # prompt_id -> response -> wins
    meta: dict = {}
    report = collections.Counter()
    for c in comparisons:
        pid = c["prompt_id"]
        meta.setdefault(pid, {"prompt": c["prompt"], "judge": judge or c["judge"], "models": {}})
        for side in ("1", "2"):
            wins[pid].setdefault(c[f"response_{side}"], 0.0)
            meta[pid]["models"].setdefault(c[f"response_{side}"], c.get(f"model_{side}"))
        if c["verdict"] not in WINS:
            report["invalid"] += 1
            continue
        a, b = WINS[c["verdict"]]
        wins[pid][c["response_1"]] += a
        wins[pid][c["response_2"]] += b
    out = []
    for pid, scores in wins.items():
        ranked = list(scores.items())  # first-seen order breaks ties
        best = max(ranked, key=lambda kv: kv[1])
        worst = min(reversed(ranked), key=lambda kv: kv[1])
        if best[1] == worst[1]:
            report["all_tied"] += 1
            continue
        m = meta[pid]
        out.append(
            {
                "prompt_id": pid,
                "prompt": m["prompt"],
                "response_1": best[0],
                "response_2": worst[0],
                "judge": m["judge"],
                "verdict": "first",
                "raw_judge_text": "",
                "swapped": False,
                "model_1": m["models"][best[0]],
                "model_2": m["models"][worst[0]],
                "wins_1": best[1],
                "wins_2": worst[1],
            }
        )
    report.update(prompts=len(wins), pairs=len(out))
    return out, dict(report)


def write_best_vs_worst(comparison_dirs: Sequence[str], out_dir: str, num_shards: int = 1) -> dict:
    """best_vs_worst over finished critic outputs -> a comparison set preferences_stage reads
    (records, comparisons.jsonl and report.json; the manifest, written last, marks it done).

    Args:
      comparison_dirs: critic_stage outputs of sample i vs sample j.
      out_dir: where the set goes.
      num_shards: shards of the record set.

    Returns:
      The report: prompts, pairs, all_tied, invalid.
    """
    comps, report = best_vs_worst(c for d in comparison_dirs for c in load_comparisons(d))
    if not comps:
        raise ConfigError(
            f"best-vs-worst: the critic found no better sample for any prompt in {list(comparison_dirs)} "
            f"({report}); use pairing 'teacher' or 'mix', or more samples"
        )
    fileio.makedirs(out_dir)
    fileio.write_jsonl(fileio.join(out_dir, "comparisons.jsonl"), comps)
    fileio.write_json(fileio.join(out_dir, "report.json"), report)
    write_records(
        out_dir,
        COMPARISONS,
        [comparison_record(c) for c in comps],
        num_shards=num_shards,
        provenance={
            "stage": "best_vs_worst",
            "sources": [fileio.abspath(d) for d in comparison_dirs],
            "report": report,
        },
    )
    return report


def api_cost(comparison_dirs: Sequence[str]) -> float:
    """US dollars the critic's requests behind these critic outputs cost (their
    report.json; answers served from the cache cost nothing again)."""
    total = 0.0
    for d in comparison_dirs:
        path = fileio.join(d, "report.json")
        if fileio.exists(path):
            total += float(fileio.read_json(path).get("api", {}).get("cost_usd") or 0.0)
    return total
