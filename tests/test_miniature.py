"""A reduced miniature (a few dozen steps per stage) runs every stage end to end over the
real API path and leaves each stage's records, metrics, the table and the plot; a rerun
resumes without asking the API again."""

import json
import os

import pytest

from rlaif_jax.data.records import read_manifest
from rlaif_jax.feedback.cache import read_cache_lines
from rlaif_jax.miniature import run_miniature, win_rate

SMALL = dict(num_prompts=100, num_eval=20, sft_epochs=2, sft_small_epochs=4, dpo_epochs=1, rm_epochs=1,
             ppo_iterations=2, batch_size=16, hidden_size=64, progress=False)


def test_win_rate_counts_ties_half_and_never_scores_invalid():
    comps = [{"verdict": v} for v in ["first"] * 3 + ["second"] * 4 + ["tie"] * 2 + ["invalid"] * 5]
    r = win_rate(comps)
    assert r["n"] == 9 and r["invalid"] == 5
    assert r["win_rate"] == pytest.approx(100 * 4 / 9)
    scores = [1] * 3 + [0] * 4 + [0.5] * 2
    mean = sum(scores) / 9
    se = (sum((s - mean) ** 2 for s in scores) / 8 / 9) ** 0.5
    assert r["se"] == pytest.approx(100 * se)


def test_reduced_miniature_runs_every_stage(tmp_path):
    out = str(tmp_path / "mini")
    rows = run_miniature(out_dir=out, **SMALL)
    assert [r["arm"] for r in rows] == ["sft_weak_10", "sft_weak_100", "sft_strong_100", "dpo_weak_10", "ppo_weak_10"]
    for sub in ("data/prompts/sft", "data/prompts/feedback", "data/weak-teacher/sft", "data/strong-teacher/feedback",
                "data/reference/eval", "data/policy_samples", "data/comparisons", "data/preferences"):
        m = read_manifest(os.path.join(out, sub))
        assert sum(s["num_records"] for s in m["shards"]) > 0, sub
    prompts = {s: sum(x["num_records"] for x in read_manifest(os.path.join(out, "data/prompts", s))["shards"])
               for s in ("sft", "feedback")}
    assert prompts == {"sft": 10, "feedback": 90}
    for arm in ("sft_weak_10", "sft_weak_100", "sft_strong_100", "dpo_weak_10", "rm_weak_10", "ppo_weak_10"):
        assert os.path.exists(os.path.join(out, "runs", arm, "hf", "config.json")), arm
        assert os.path.getsize(os.path.join(out, "runs", arm, "metrics.jsonl")) > 0, arm
    for r in rows:
        assert r["n"] + r["invalid"] == 20 and 0 <= r["win_rate"] <= 100 and 0 <= r["task_score"] <= 100
        assert json.load(open(os.path.join(out, "eval", r["arm"], "metrics.json")))["win_rate"] == r["win_rate"]
    for f in ("results.md", "results.csv", "results.png"):
        assert os.path.getsize(os.path.join(out, f)) > 0
    # The critic's order randomisation was exercised: some judgments saw the pair swapped.
    swaps = [c["swapped"] for c in map(json.loads, open(os.path.join(out, "data/comparisons/comparisons.jsonl")))]
    assert 0 < sum(swaps) < len(swaps)
    # Rerun: every stage is found done and no request goes to the API again.
    before = {f: len(read_cache_lines(os.path.join(out, "cache", f))) for f in os.listdir(os.path.join(out, "cache"))}
    again = run_miniature(out_dir=out, **SMALL)
    after = {f: len(read_cache_lines(os.path.join(out, "cache", f))) for f in os.listdir(os.path.join(out, "cache"))}
    assert before == after and [r["win_rate"] for r in again] == [r["win_rate"] for r in rows]
