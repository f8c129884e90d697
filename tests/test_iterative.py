"""Iterative RLAIF (issue 18): the round settings and pairings, a chained arm's rounds
(resumed mid-round without redoing or re-asking anything, round r starting from round r-1's
policy against the SFT reference), and the miniature's optional iterative arm."""

import json
import os
import re

import pytest

from rlaif_jax.errors import ConfigError
from rlaif_jax.iterative import IterativeSettings, best_vs_worst, comparison_sets, preference_sources
from rlaif_jax.pipeline import ArmError, run_arm
from tests import test_arm
from tests.test_arm import cache_sizes, configure, states

world = test_arm.world  # the synthetic world of the arm tests, as this module's fixture

pytestmark = pytest.mark.usefixtures("clean_gin")


def comp(pid, a, b, verdict):
    return {
        "prompt_id": pid,
        "prompt": f"prompt {pid}",
        "response_1": a,
        "response_2": b,
        "verdict": verdict,
        "judge": "critic",
        "model_1": "policy",
        "model_2": "policy",
    }


def test_best_vs_worst_picks_most_wins_over_fewest_and_skips_ties():
    comps = [
        # p1: c beats a and b, a beats b -> c over b
        comp("p1", "a", "b", "first"),
        comp("p1", "a", "c", "second"),
        comp("p1", "b", "c", "second"),
        # p2: every pair tied -> no pair
        comp("p2", "a", "b", "tie"),
        comp("p2", "a", "c", "tie"),
        comp("p2", "b", "c", "tie"),
        # p3: one decided verdict, one invalid (left out), one tie: b 1.5, a 0.5, c 1 -> b over a
        comp("p3", "a", "b", "second"),
        comp("p3", "a", "c", "invalid"),
        comp("p3", "b", "c", "tie"),
        # p4: a cycle (each wins once): all tied on wins -> no pair
        comp("p4", "a", "b", "first"),
        comp("p4", "b", "c", "first"),
        comp("p4", "c", "a", "first"),
    ]
    pairs, report = best_vs_worst(comps)
    assert [(p["prompt_id"], p["response_1"], p["response_2"]) for p in pairs] == [("p1", "c", "b"), ("p3", "b", "a")]
    assert all(p["verdict"] == "first" and p["judge"] == "critic" for p in pairs)
    assert pairs[0]["wins_1"] == 2.0 and pairs[0]["wins_2"] == 0.0
    assert report == {"prompts": 4, "pairs": 2, "all_tied": 2, "invalid": 1}
    # Two samples: one comparison decides the pair; the order judged does not matter.
    pairs, _ = best_vs_worst([comp("p", "x", "y", "second")])
    assert (pairs[0]["response_1"], pairs[0]["response_2"]) == ("y", "x")


def test_pairings_choose_what_the_critic_judges_and_trains_on():
    samples, teacher, d = ["s0", "s1", "s2"], "teacher", "c"
    names = lambda it: [os.path.basename(o) for _, _, o in comparison_sets(it, samples, teacher, d)]  # noqa: E731
    it = IterativeSettings(pairing="teacher", samples=3)
    assert names(it) == ["teacher-0", "teacher-1", "teacher-2"]
    assert preference_sources(it, d) == ["c/teacher-0", "c/teacher-1", "c/teacher-2"]
    it = IterativeSettings(pairing="best_worst", samples=3)
    assert comparison_sets(it, samples, teacher, d) == [
        ("s0", "s1", "c/samples-0-1"),
        ("s0", "s2", "c/samples-0-2"),
        ("s1", "s2", "c/samples-1-2"),
    ]
    assert preference_sources(it, d) == ["c/best_worst"]
    it = IterativeSettings(pairing="mix", samples=2)
    assert names(it) == ["teacher-0", "teacher-1", "samples-0-1"]
    assert preference_sources(it, d) == ["c/teacher-0", "c/teacher-1", "c/best_worst"]
    assert [IterativeSettings(reference="sft").reference_round(r) for r in (1, 3)] == [0, 0]
    assert [IterativeSettings(reference="previous").reference_round(r) for r in (1, 3)] == [0, 2]


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(rounds=0), r"rounds must be a whole number > 0, got 0"),
        (dict(rounds=-2), r"rounds must be a whole number > 0"),
        (dict(pairing="best_of_n"), r"pairing must be one of \('teacher', 'best_worst', 'mix'\), got 'best_of_n'"),
        (dict(reference="base"), r"reference must be one of"),
        (dict(samples=0), r"samples must be a whole number > 0"),
        (dict(pairing="best_worst", samples=1), r"samples must be >= 2, got 1"),
    ],
)
def test_bad_round_settings_are_one_line_errors(kw, match):
    with pytest.raises(ConfigError, match=match) as e:
        IterativeSettings(**kw)
    assert re.search(match, str(e.value).splitlines()[0])  # gin appends the configurable's name below


def test_rounds_refuse_one_round_stages_beside_them(world):
    configure(world, "bad_rounds", "run_arm.stages = ['sft', 'critic', 'rounds', 'evaluate']")
    with pytest.raises(ArmError, match=r"'rounds' \(iterative RLAIF\) runs its own .* leave out \['critic'\]"):
        run_arm()


def test_iterative_arm_runs_rounds_and_resumes_mid_round(world, monkeypatch):
    """Two rounds, pairs mixed (sample vs teacher and best vs worst of two samples); the
    run is killed at round 2's DPO and relaunched: nothing done is redone or asked again."""
    from rlaif_jax.train import loop

    bindings = (
        "run_arm.stages = ['prompts', 'teacher', 'sft', 'rounds', 'evaluate']",
        "IterativeSettings.rounds = 2",
        "IterativeSettings.pairing = 'mix'",
        "IterativeSettings.samples = 2",
        "preference_pipeline.num_epochs = 1",
    )
    arm_dir = configure(world, "iterative", *bindings)
    real = loop.train

    def killed_in_round_2(**kw):
        if os.path.join("rounds", "2", "dpo") in kw["run_dir"]:
            raise RuntimeError("killed")
        return real(**kw)

    monkeypatch.setattr(loop, "train", killed_in_round_2)
    with pytest.raises(RuntimeError, match="killed"):
        run_arm()
    st = states(arm_dir)
    assert all(st[f"round1/{s}"] == "done" for s in ("samples", "critic", "preferences", "dpo", "evaluate"))
    assert [st[f"round2/{s}"] for s in ("samples", "critic", "preferences", "dpo")] == ["done"] * 3 + ["failed"]
    rounds = os.path.join(arm_dir, "rounds")
    marks = [
        os.path.join(rounds, "1", "dpo", "summary.json"),
        os.path.join(rounds, "2", "preferences", "manifest.json"),
    ]
    mtimes, before = [os.path.getmtime(m) for m in marks], cache_sizes(world)

    monkeypatch.setattr(loop, "train", real)
    configure(world, "iterative", *bindings)
    summary = run_arm()
    st = states(arm_dir)
    assert all(st[f"round{r}/{s}"] == "reused" for r in (1, 2) for s in ("samples", "critic", "preferences"))
    assert st["round1/dpo"] == "reused" and st["round2/dpo"] == "done" and st["evaluate"] == "done"
    assert [os.path.getmtime(m) for m in marks] == mtimes
    assert cache_sizes(world)["critic.jsonl"] == before["critic.jsonl"]  # no critic request asked twice
    # Round 2 started from round 1's policy and kept the SFT model as the DPO reference.
    with open(os.path.join(arm_dir, "status.json")) as f:
        dpo2 = json.load(f)["stages"]["round2/dpo"]
    assert dpo2["init_from"] == os.path.join(rounds, "1", "dpo", "hf")
    assert dpo2["reference"] == os.path.join(arm_dir, "sft", "hf")
    assert summary["policy"] == os.path.join(rounds, "2", "dpo", "hf")
    # Both kinds of pairs, per round; the critic's cost per round (the local world is free).
    for r in (1, 2):
        assert 0 < summary[f"round{r}/best_worst/pairs"] < summary[f"round{r}/preferences/pairs"]
        assert summary[f"round{r}/critic/judged"] + summary[f"round{r}/critic/invalid"] == 2 * 54
        assert summary[f"round{r}/cost_usd"] == 0.0 and summary[f"round{r}/dpo/step"] > 0
    assert "round1/eval/win_rate" in summary and "eval/win_rate" in summary and "round2/eval/win_rate" not in summary
    with open(os.path.join(rounds, "1", "samples", "1", "manifest.json")) as f:
        assert json.load(f)["provenance"]["seed"] == 1000  # each sample its own seed


def test_the_miniature_iterative_arm_is_optional():
    """The default miniature (its arms, hence its table) is unchanged: the iterative arm runs
    only when asked for."""
    import inspect

    from rlaif_jax.miniature import ARMS, OPTIONAL_ARMS, MiniatureSettings

    assert ARMS == (
        "sft_weak_10",
        "sft_weak_100",
        "sft_strong_100",
        "sft_strong_10",
        "dpo_weak_10",
        "ppo_weak_10",
        "dpo_strong_10",
    )
    assert MiniatureSettings().arms == ARMS and inspect.signature(MiniatureSettings).parameters["arms"].default == ARMS
    assert "dpo_weak_10_iter" in OPTIONAL_ARMS and MiniatureSettings(arms=("dpo_weak_10_iter",)).iterative is None
    with pytest.raises(ConfigError, match="unknown arms.*dpo_weak_10_iter"):
        MiniatureSettings(arms=("dpo_weak_11",))


@pytest.mark.slow  # a reduced miniature: four minutes on 2 shared cores
def test_miniature_iterative_arm_reports_each_round(tmp_path):
    """Round 1 with the paper's pairs and the SFT reference is the one-round DPO arm exactly
    (same samples, seeds, judgments, training); each round is a row, plotted by round."""
    from rlaif_jax.miniature import MiniatureSettings, run_miniature

    out = str(tmp_path / "mini")
    small = dict(
        num_prompts=60,
        num_eval=16,
        num_pretrain=40,
        pretrain_epochs=1,
        sft_small_epochs=2,
        dpo_epochs=1,
        batch_size=8,
        hidden_size=32,
        feedback_samples=2,
        progress=False,
    )
    rows = run_miniature(
        MiniatureSettings(
            out_dir=out,
            arms=("dpo_weak_10", "dpo_weak_10_iter"),
            iterative=IterativeSettings(rounds=2, samples=2),
            **small,
        )
    )
    assert [r["arm"] for r in rows] == ["dpo_weak_10", "dpo_weak_10_iter/round1", "dpo_weak_10_iter/round2"]
    assert rows[2]["label"] == "SFT weak 10% + iterative DPO, round 2"
    for k in ("win_rate", "se", "task_score", "wins", "losses"):
        assert rows[1][k] == rows[0][k], k
    # The rounds ran as the pipeline's iterative arm: its summary has each round's numbers.
    arm = json.load(open(os.path.join(out, "arms", "dpo_weak_10_iter", "summary.json")))
    for r in (1, 2):
        assert arm[f"round{r}/preferences/pairs"] > 0 and 0 <= arm[f"round{r}/critic/policy_preferred"] <= 100
    assert os.path.getsize(os.path.join(out, "rounds.png")) > 0
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert summary["dpo_weak_10_iter/round2/win_rate"] == rows[2]["win_rate"]
