"""The miniature's findings apply the thresholds the issue states, on paired differences."""

import random

from rlaif_jax.synthetic.findings import findings, flatten, markdown


def _arm(p_win: float, p_task: float, seed: int, n: int = 400) -> dict:
    rng = random.Random(seed)
    return {
        "win": {f"p{i}": float(rng.random() < p_win) for i in range(n)},
        "task": {f"p{i}": float(rng.random() < p_task) for i in range(n)},
    }


def test_findings_hold_for_the_papers_pattern_and_fail_without_it():
    paper = {
        "sft_weak_10": _arm(0.30, 0.40, 0),
        "dpo_weak_10": _arm(0.45, 0.55, 1),
        "ppo_weak_10": _arm(0.42, 0.50, 2),
        "sft_strong_100": _arm(0.50, 0.70, 3),
        "sft_strong_10": _arm(0.44, 0.60, 4),
        "dpo_strong_10": _arm(0.45, 0.61, 5),
    }
    found = {f.key: f for f in findings(paper)}
    assert sorted(found) == ["1", "1b", "2", "3"]
    assert all(f.holds for f in found.values()), markdown(list(found.values()))
    # RL that does nothing, and a strong-teacher DPO gain as large as the weak one, fail.
    flat = dict(
        paper, dpo_weak_10=paper["sft_weak_10"], ppo_weak_10=_arm(0.30, 0.35, 6), dpo_strong_10=_arm(0.60, 0.75, 7)
    )
    found = {f.key: f for f in findings(flat)}
    assert not found["1"].holds and not found["1b"].holds and not found["3"].holds
    assert found["1"].win.diff == 0.0
    summary = flatten(list(found.values()))
    assert summary["finding/1/holds"] is False and summary["finding/1/n"] == 400
    # Arms that were not run leave their findings out.
    assert [f.key for f in findings({k: paper[k] for k in ("sft_weak_10", "dpo_weak_10")})] == ["1"]
