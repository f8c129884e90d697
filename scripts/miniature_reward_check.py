"""How well a miniature run's reward model tracks the truth: its score on every evaluation
sample of an arm against the sample's true task score (Spearman), and how often it ranks
two policy samples of one feedback prompt as their true scores do. Read-only.

usage: python scripts/miniature_reward_check.py RUN_DIR [--reward_model DIR] [--arm sft_weak_10]
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np

from rlaif_jax import cli


def _samples(path: str) -> list:
    with open(path, encoding="utf-8") as f:
        return [s for line in f for s in json.loads(line)["samples"]]


def _ranks(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(len(x))
    for v in np.unique(x):  # ties share their mean rank
        ranks[x == v] = ranks[x == v].mean()
    return ranks


def spearman(a, b) -> float:
    return float(np.corrcoef(_ranks(np.asarray(a, float)), _ranks(np.asarray(b, float)))[0, 1])


def main(argv=None) -> None:
    from rlaif_jax.eval.reward_score import RewardScorer
    from rlaif_jax.synthetic.tasks import parse_instruction, score

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir")
    ap.add_argument("--reward_model", default=None, help="HF dir (default RUN_DIR/runs/rm_weak_10/hf)")
    ap.add_argument("--arm", default="sft_weak_10", help="the SFT arm whose samples are scored")
    a = ap.parse_args(argv)
    rm = a.reward_model or os.path.join(a.run_dir, "runs", "rm_weak_10", "hf")
    scorer = RewardScorer(rm, max_length=64, max_prompt_length=32, batch_size=64)

    def rewards_and_truth(samples):
        r = scorer.score([s["prompt"] for s in samples], [s["completion"] for s in samples])
        return r, np.array([score(parse_instruction(s["prompt"]), s["completion"]) for s in samples])

    ev = _samples(os.path.join(a.run_dir, "eval", a.arm, "generations", "samples.jsonl"))
    r, t = rewards_and_truth(ev)
    print(f"eval samples of {a.arm}: {len(ev)}, Spearman(reward, true score) = {spearman(r, t):.3f}")
    feedback = os.path.join(a.run_dir, "data", "feedback", a.arm, "samples")
    first, second = (_samples(os.path.join(feedback, k, "samples.jsonl")) for k in ("0", "1"))
    by_id = {s["prompt_id"]: s for s in second}
    pairs = [(s, by_id[s["prompt_id"]]) for s in first if s["prompt_id"] in by_id]
    r1, t1 = rewards_and_truth([p[0] for p in pairs])
    r2, t2 = rewards_and_truth([p[1] for p in pairs])
    differ = t1 != t2
    agree = np.mean((r1[differ] > r2[differ]) == (t1[differ] > t2[differ])) if differ.any() else float("nan")
    print(
        f"pairs of two policy samples with different true scores: {int(differ.sum())}, ranked as the truth: {agree:.1%}"
    )


if __name__ == "__main__":
    raise SystemExit(cli.run(main))
