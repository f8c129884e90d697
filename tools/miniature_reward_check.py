"""How well a miniature run's reward model tracks the truth: its score on every evaluation
sample of an arm against the sample's true task score (Spearman); how often it ranks two
answers to one prompt as their true scores do, on the feedback prompts (the policy's two
samples: pairs the reward model may have learned, with rm_sample_pairs) and on the held-out
evaluation prompts (the SFT arms' answers, pair by pair: what PPO needs of it on prompts it
never saw). Read-only.

usage: python tools/miniature_reward_check.py RUN_DIR [--reward_model DIR] [--arm sft_weak_10]
"""

from __future__ import annotations

import argparse
import itertools
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


def pair_agreement(rewards, truths) -> tuple[int, float]:
    """Over pairs of answers to one prompt whose true scores differ: (how many, the share the
    reward ranks as the truth does). rewards / truths: (num_prompts, answers per prompt)."""
    r, t = np.asarray(rewards, float), np.asarray(truths, float)
    agree, n = 0, 0
    for i, j in itertools.combinations(range(r.shape[1]), 2):
        differ = t[:, i] != t[:, j]
        n += int(differ.sum())
        agree += int(((r[differ, i] > r[differ, j]) == (t[differ, i] > t[differ, j])).sum())
    return n, (agree / n if n else float("nan"))


def pair_agreement_by_group(rewards, truths, groups) -> dict:
    """pair_agreement over each group's prompts (rows), e.g. by task: group -> (pairs, share)."""
    r, t, g = np.asarray(rewards, float), np.asarray(truths, float), np.asarray(groups)
    return {k: pair_agreement(r[g == k], t[g == k]) for k in sorted(set(groups))}


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
    n, agree = pair_agreement(np.stack([r1, r2], 1), np.stack([t1, t2], 1))
    print(
        f"feedback prompts, pairs of two policy samples with different true scores: {n}, ranked as the truth: {agree:.1%}"
    )
    arms = [d for d in sorted(os.listdir(os.path.join(a.run_dir, "eval"))) if d.startswith("sft_")]
    by_arm = [
        {s["prompt_id"]: s for s in _samples(os.path.join(a.run_dir, "eval", arm, "generations", "samples.jsonl"))}
        for arm in arms
    ]
    ids = sorted(set.intersection(*(set(b) for b in by_arm)))
    scored = [rewards_and_truth([b[i] for i in ids]) for b in by_arm]
    n, agree = pair_agreement(np.stack([r for r, _ in scored], 1), np.stack([t for _, t in scored], 1))
    print(
        f"held-out eval prompts, pairs of the answers of {', '.join(arms)} with different true scores: {n}, "
        f"ranked as the truth: {agree:.1%}"
    )
    kinds = [parse_instruction(by_arm[0][i]["prompt"]).kind for i in ids]
    rewards, truths = np.stack([r for r, _ in scored], 1), np.stack([t for _, t in scored], 1)
    per_task = pair_agreement_by_group(rewards, truths, kinds)
    # PPO climbs whatever the reward model gets wrong, task by task: an average hides a task it cannot rank.
    print("  by task: " + ", ".join(f"{k} {share:.1%} of {m}" for k, (m, share) in per_task.items()))


if __name__ == "__main__":
    raise SystemExit(cli.run(main))
