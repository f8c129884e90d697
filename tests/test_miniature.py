"""A reduced miniature (a few dozen steps per stage) runs every arm through the pipeline's
stages (rlaif_jax.pipeline) end to end over the real API path and leaves each stage's
records, metrics, the findings, the table and the plot; a rerun resumes without asking the
API again. The full default miniature, with the thresholds the README states, is the slow
test at the end."""

import json
import os

import pytest

from rlaif_jax.data.records import read_manifest
from rlaif_jax.feedback.cache import read_cache_lines
from rlaif_jax.feedback.stages import load_comparisons
from rlaif_jax.miniature import ARMS, MiniatureSettings, run_miniature, win_rate

SMALL = dict(
    num_prompts=100,
    num_eval=20,
    num_pretrain=60,
    pretrain_epochs=1,
    sft_epochs=1,
    sft_small_epochs=2,
    dpo_epochs=1,
    rm_epochs=1,
    ppo_iterations=2,
    batch_size=16,
    hidden_size=64,
    feedback_samples=2,
    rm_samples=3,
    kto_epochs=1,
    progress=False,
)


def test_win_rate_counts_ties_half_and_never_scores_invalid():
    comps = [{"verdict": v} for v in ["first"] * 3 + ["second"] * 4 + ["tie"] * 2 + ["invalid"] * 5]
    r = win_rate(comps)
    assert r["n"] == 9 and r["invalid"] == 5
    assert r["win_rate"] == pytest.approx(100 * 4 / 9)
    scores = [1] * 3 + [0] * 4 + [0.5] * 2
    mean = sum(scores) / 9
    se = (sum((s - mean) ** 2 for s in scores) / 8 / 9) ** 0.5
    assert r["se"] == pytest.approx(100 * se)


# The optional one-round arms, run after the default ones in the same reduced miniature.
NEW_ARMS = ("kto_weak_10", "orpo_weak_10", "dpo_weak_10_lora")


def test_reduced_miniature_runs_every_stage(tmp_path, clean_gin):
    out = str(tmp_path / "mini")
    rows = run_miniature(MiniatureSettings(out_dir=out, arms=NEW_ARMS[:1] + ARMS + NEW_ARMS[1:], **SMALL))
    assert [r["arm"] for r in rows] == list(NEW_ARMS[:1] + ARMS + NEW_ARMS[1:])  # rows as asked
    fb = "data/feedback/sft_weak_10"
    for sub in (
        "data/prompts/sft",
        "data/prompts/feedback",
        "data/teachers/weak-teacher/demonstrations/sft",
        "data/teachers/strong-teacher/demonstrations/feedback",
        "data/reference/eval",
        "data/web/pretrain",
        f"{fb}/samples/0",
        f"{fb}/samples/1",
        f"{fb}/comparisons/teacher-1",
        f"{fb}/samples/2",
        f"{fb}/comparisons/samples-0-1",
        f"{fb}/comparisons/samples-1-2",
        f"{fb}/preferences",
        f"{fb}/preferences_rm",
        "data/feedback/sft_strong_10/preferences",
    ):
        m = read_manifest(os.path.join(out, sub))
        assert sum(s["num_records"] for s in m["shards"]) > 0, sub
    # DPO learns sample-vs-teacher pairs of the first feedback_samples samples; the reward
    # model those plus the critic's decided verdicts between each two of rm_samples policy
    # samples of a prompt (rm_sample_pairs), and only it: the third sample is judged against
    # the other two, never against the teacher.
    records = lambda sub: sum(s["num_records"] for s in read_manifest(os.path.join(out, sub))["shards"])  # noqa: E731
    decided = 0
    for pair in ("0-1", "0-2", "1-2"):
        between = load_comparisons(os.path.join(out, fb, f"comparisons/samples-{pair}"))
        assert len(between) == 90, pair
        decided += sum(c["verdict"] in ("first", "second") for c in between)
    assert 0 < decided
    # A decided verdict is kept unless its two samples are the same answer, or the same pair
    # was already kept (the preferences stage's report counts both).
    same = lambda sub: sum(  # noqa: E731
        json.load(open(os.path.join(out, sub, "report.json")))["dropped"].get(k, 0)
        for k in ("identical_responses", "duplicate")
    )
    assert records(f"{fb}/preferences_rm") == records(f"{fb}/preferences") + decided - (
        same(f"{fb}/preferences_rm") - same(f"{fb}/preferences")
    )
    assert not os.path.exists(os.path.join(out, fb, "comparisons/teacher-2"))
    assert not os.path.exists(os.path.join(out, "data/feedback/sft_strong_10/comparisons/samples-0-1"))
    assert not os.path.exists(os.path.join(out, "data/feedback/sft_strong_10/samples/2"))
    prompts = {
        s: sum(x["num_records"] for x in read_manifest(os.path.join(out, "data/prompts", s))["shards"])
        for s in ("sft", "feedback")
    }
    assert prompts == {"sft": 10, "feedback": 90}
    for arm in ("base",) + ARMS + NEW_ARMS + ("rm_weak_10",):
        assert os.path.exists(os.path.join(out, "runs", arm, "hf", "config.json")), arm
        assert os.path.getsize(os.path.join(out, "runs", arm, "metrics.jsonl")) > 0, arm
    for r in rows:
        assert r["n"] + r["invalid"] == 20 and 0 <= r["win_rate"] <= 100 and 0 <= r["task_score"] <= 100
        assert json.load(open(os.path.join(out, "eval", r["arm"], "metrics.json")))["win_rate"] == r["win_rate"]
    for f in ("results.md", "results.csv", "results.png"):
        assert os.path.getsize(os.path.join(out, f)) > 0
    summary = json.load(open(os.path.join(out, "summary.json")))
    for key in ("1", "1b", "2", "3"):
        assert isinstance(summary[f"finding/{key}/holds"], bool) and summary[f"finding/{key}/n"] == 20
    assert 0 <= summary["critic/sft_weak_10/policy_preferred"] <= 100
    env = summary["environment"]
    assert env["backend"] == "cpu" and env["packages"]["jax"] and env["cpu"]
    md = open(os.path.join(out, "results.md")).read()
    assert "paired differences" in md and f"jax {env['packages']['jax']}" in md
    # Evaluation is the judge's, feedback the critic's: separate models, separate caches.
    assert os.path.getsize(os.path.join(out, "cache", "judge.jsonl")) > 0
    assert all(
        json.loads(line)["judge"] == "judge"
        for line in open(os.path.join(out, "eval/dpo_weak_10/judgments/comparisons.jsonl"))
    )
    # The critic's order randomisation was exercised: some judgments saw the pair swapped.
    swaps = [
        c["swapped"] for c in map(json.loads, open(os.path.join(out, fb, "comparisons/teacher-0/comparisons.jsonl")))
    ]
    assert 0 < sum(swaps) < len(swaps)
    # The optional arms: KTO learnt the critic's ratings of sft_weak_10's samples and the
    # teacher's replies; ORPO and LoRA DPO trained on dpo_weak_10's pairs; each one's gain
    # over SFT weak 10% is in the report, beside DPO's.
    labelled = read_manifest(os.path.join(out, fb, "labelled"))["provenance"]["counts"]
    assert labelled["responses"] == 2 * 90 * 2 and labelled["desirable"] + labelled["undesirable"] > 0
    assert len(load_comparisons(os.path.join(out, fb, "ratings/teacher-1"))) == 90
    status = lambda arm: json.load(open(os.path.join(out, "arms", arm, "status.json")))["stages"]  # noqa: E731
    assert status("orpo_weak_10")["dpo"]["objective"] == "orpo" and status("orpo_weak_10")["dpo"]["reference"] is None
    assert "objective" not in status("dpo_weak_10_lora")["dpo"]
    assert set(status("kto_weak_10")) == {"sft", "samples", "ratings", "kto", "evaluate"}
    assert "LoraSettings.rank = 8" in open(os.path.join(out, "runs/dpo_weak_10_lora/config.gin")).read()
    assert "LoraSettings.rank = 0" in open(os.path.join(out, "runs/dpo_weak_10/config.gin")).read()
    assert "Other objectives on the same SFT policy" in md
    for arm in ("dpo_weak_10",) + NEW_ARMS:
        assert summary[f"gain/{arm}/win_se"] >= 0, arm
    # Rerun with the default arms alone: every stage is found done, no request goes to the
    # API again, and the report is the default one (no optional arms' gains).
    before = {f: len(read_cache_lines(os.path.join(out, "cache", f))) for f in os.listdir(os.path.join(out, "cache"))}
    again = run_miniature(MiniatureSettings(out_dir=out, **SMALL))
    after = {f: len(read_cache_lines(os.path.join(out, "cache", f))) for f in os.listdir(os.path.join(out, "cache"))}
    first = {r["arm"]: r["win_rate"] for r in rows}
    assert before == after and [r["win_rate"] for r in again] == [first[a] for a in ARMS]
    assert "Other objectives" not in open(os.path.join(out, "results.md")).read()
    assert not any(k.startswith("gain/") for k in json.load(open(os.path.join(out, "summary.json"))))


def test_reward_model_sample_pairs_need_two_samples_per_prompt():
    from rlaif_jax.errors import ConfigError
    from rlaif_jax.miniature import MiniatureSettings

    with pytest.raises(ConfigError, match=r"rm_sample_pairs.*rm_samples = 1"):
        MiniatureSettings(rm_samples=1)
    MiniatureSettings(rm_samples=1, rm_sample_pairs=False)
    MiniatureSettings(rm_samples=1, arms=("sft_weak_10", "dpo_weak_10"))  # no reward model to train
    MiniatureSettings(feedback_samples=1)  # DPO's one sample per prompt; the reward model's pairs draw on two
    with pytest.raises(ConfigError, match=r"run_miniature.rm_samples must be > 0"):
        MiniatureSettings(rm_samples=0, rm_sample_pairs=False)
    with pytest.raises(ConfigError, match=r"run_miniature.seq_len must exceed the prompts' 32 tokens"):
        MiniatureSettings(seq_len=32)


@pytest.mark.parametrize(
    "knob, value, message",
    [
        ("ppo_iterations", 0, r"run_miniature.ppo_iterations = 0: must be a whole number >= 1"),
        ("ppo_lr", -1e-4, r"run_miniature.ppo_lr = -0.0001: must be > 0"),
        ("dpo_lr", float("nan"), r"run_miniature.dpo_lr = nan: must be > 0"),
        ("ppo_kl_coef", -0.1, r"run_miniature.ppo_kl_coef = -0.1: must be >= 0"),
        ("eval_top_p", 0.0, r"run_miniature.eval_top_p = 0.0"),
    ],
)
def test_bad_training_knobs_are_refused_before_any_stage_runs(knob, value, message):
    from rlaif_jax.errors import ConfigError
    from rlaif_jax.miniature import MiniatureSettings

    with pytest.raises(ConfigError, match=message):
        MiniatureSettings(**{knob: value})


def test_a_user_binding_of_a_knob_the_campaign_sets_is_refused(tmp_path, clean_gin):
    """One door per knob: the miniature's DPO learning rate is run_miniature.dpo_lr, so a
    recipe-style binding of the same key is an error before anything is made, not ignored."""
    import gin

    from rlaif_jax.errors import ConfigError

    gin.bind_parameter("dpo/make_optimizer.learning_rate", 1e-3)
    with pytest.raises(ConfigError, match=r"dpo/make_optimizer.learning_rate is set by the miniature"):
        run_miniature(MiniatureSettings(out_dir=str(tmp_path / "mini")))
    assert not os.path.exists(tmp_path / "mini")


def test_shared_dir_refuses_a_base_made_with_other_settings(tmp_path):
    from rlaif_jax.miniature.world import claim_shared

    claim_shared(str(tmp_path), {"seed": 0, "hidden_size": 64})
    claim_shared(str(tmp_path), {"seed": 0, "hidden_size": 64})  # the same settings: reused
    with pytest.raises(ValueError, match=r"run_miniature.shared_dir=.*hidden_size"):
        claim_shared(str(tmp_path), {"seed": 0, "hidden_size": 128})


@pytest.mark.slow
def test_default_miniature_shows_the_papers_findings(tmp_path):
    """The README's main job, at its defaults (seed 0): about 11 minutes on the README's 2 quiet CPU cores."""
    run_miniature(MiniatureSettings(out_dir=str(tmp_path / "mini"), progress=False))
    summary = json.load(open(tmp_path / "mini" / "summary.json"))
    failed = [k for k in ("1", "1b", "2", "3") if not summary[f"finding/{k}/holds"]]
    assert not failed, open(tmp_path / "mini" / "results.md").read()
