"""A chained arm (rlaif_jax.pipeline) runs every stage through the gin recipe, against the
synthetic world served over the OpenAI-compatible API on 127.0.0.1; a relaunch reuses what
is done without asking the API again; a failing stage is recorded and resumed; arms share
data and each other's stages."""

import dataclasses
import glob
import json
import os
import subprocess
import sys

import gin
import pytest

from rlaif_jax.data.records import read_manifest, read_records
from rlaif_jax.errors import UserError
from rlaif_jax.feedback.cache import read_cache_lines
from rlaif_jax.feedback.server import ServerThread, make_app
from rlaif_jax.miniature.world import task_accuracy
from rlaif_jax.pipeline import STAGES, ArmError, ArmSettings, run_arm
from rlaif_jax.synthetic.arm_inputs import write_arm_inputs
from rlaif_jax.synthetic.backend import synthetic_world
from tests.processes import free_port, run_together

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_ARM = os.path.join(ROOT, "configs", "experiments", "tiny_arm.gin")
ARMS = sorted(glob.glob(os.path.join(ROOT, "configs", "experiments", "paper", "arms", "[!_]*.gin")))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("arm_world"))
    paths = write_arm_inputs(root, num_prompts=60, num_eval=12, hidden_size=32, num_layers=1)
    with ServerThread(make_app(synthetic_world())) as srv:
        yield {"root": root, "url": srv.url, **paths}


pytestmark = pytest.mark.usefixtures("clean_gin")


def configure(world, arm, *bindings):
    gin.clear_config()
    gin.parse_config_files_and_bindings(
        [TINY_ARM],
        [
            f"API_BASE = '{world['url']}'",
            f"ARM_DIR = '{os.path.join(world['root'], arm)}'",
            f"DATA_DIR = '{os.path.join(world['root'], 'data')}'",
            f"run_arm.base_model = '{world['base_model']}'",
            f"run_arm.prompt_source = '{world['prompts']}'",
            f"run_arm.eval_set = '{world['eval_set']}'",
            "sft_pipeline.num_epochs = 3",
            "preference_pipeline.num_epochs = 1",
            "evaluate.lc_bootstrap = 0",
            "make_mesh.data = -1",  # the 8 CPU devices of the test session
            *bindings,
        ],
        skip_unknown=False,
    )
    return os.path.join(world["root"], arm)


def cache_sizes(world):
    caches = os.path.join(world["root"], "data", "api_cache")
    return {f: len(read_cache_lines(os.path.join(caches, f))) for f in sorted(os.listdir(caches))}


def states(arm_dir):
    with open(os.path.join(arm_dir, "status.json")) as f:
        return {k: v["state"] for k, v in json.load(f)["stages"].items()}


def test_dpo_arm_chains_every_stage_then_a_relaunch_reuses_all(world):
    arm_dir = configure(world, "dpo", "run_arm.evaluate_sft = True")
    summary = run_arm()
    stages = ["prompts", "teacher", "sft", "samples", "critic", "preferences", "dpo", "evaluate"]
    assert states(arm_dir) == {**{s: "done" for s in stages}, "teacher": "reused"}  # the source carries replies
    data = os.path.join(world["root"], "data")
    assert summary["prompts/sft"] == 6 and summary["prompts/feedback"] == 54
    # The critic compared the SFT policy's samples with the weak teacher's replies.
    comps = list(read_records(os.path.join(arm_dir, "comparisons")))
    assert len(comps) == 54
    assert {c["model_1"] for c in comps} == {"dpo/sft"} and {c["model_2"] for c in comps} == {"weak-teacher"}
    assert 0 <= summary["critic/policy_preferred"] <= 100 and summary["critic/judged"] + summary["critic/invalid"] == 54
    assert summary["preferences/pairs"] == read_manifest(os.path.join(arm_dir, "preferences"))["num_records"] > 0
    assert summary["policy"] == os.path.join(arm_dir, "dpo", "hf")
    # The SFT policy and the DPO policy, each judged on the 12 evaluation prompts.
    for key, sub in (("eval", "eval"), ("eval_sft", "eval_sft")):
        with open(os.path.join(arm_dir, sub, "metrics.json")) as f:
            m = json.load(f)
        assert m["n_total"] == 12 and summary[f"{key}/win_rate"] == m["win_rate"]
    with open(os.path.join(arm_dir, "eval_sft", "metrics.json")) as f:
        assert json.load(f)["checkpoint"] == os.path.join(arm_dir, "sft", "hf")
    assert summary["dpo/step"] > 0 and summary["sft/step"] > 0
    with open(os.path.join(arm_dir, "summary.json")) as f:
        assert json.load(f)["eval/win_rate"] == summary["eval/win_rate"]
    # Per-stage scoped bindings held: DPO ran at its own learning rate, SFT at its own.
    assert "dpo/make_optimizer.learning_rate = 0.0003" in open(os.path.join(arm_dir, "dpo", "config.gin")).read()

    before, mtime = cache_sizes(world), os.path.getmtime(os.path.join(arm_dir, "sft", "summary.json"))
    configure(world, "dpo", "run_arm.evaluate_sft = True")
    again = run_arm()
    assert cache_sizes(world) == before  # nothing asked twice
    assert set(states(arm_dir).values()) == {"reused"}
    assert os.path.getmtime(os.path.join(arm_dir, "sft", "summary.json")) == mtime
    assert {k: v for k, v in again.items() if k != "seconds"} == {k: v for k, v in summary.items() if k != "seconds"}
    assert os.path.isdir(os.path.join(data, "prompts", "feedback"))


def test_kto_arm_trains_on_the_critics_ratings_of_its_samples(world):
    """ratings -> kto: the critic rates each policy sample and the teacher's reply on its
    own, the labelled answers train KTO from the policy (here the base, sft_fraction 0, to
    keep the test short); a relaunch reuses every stage without asking the critic again."""
    bindings = (
        "run_arm.stages = ['prompts', 'samples', 'ratings', 'kto']",
        "run_arm.sft_fraction = 0.0",
        "labelled_pipeline.num_epochs = 1",
    )
    arm_dir = configure(world, "kto", *bindings)
    summary = run_arm()
    assert {k: v for k, v in states(arm_dir).items() if k != "prompts"} == dict.fromkeys(
        ("samples", "ratings", "kto"), "done"
    )
    comps = list(read_records(os.path.join(arm_dir, "ratings")))
    assert len(comps) == 54 and {c["model_2"] for c in comps} == {"weak-teacher"}
    counts = read_manifest(os.path.join(arm_dir, "labelled"))["provenance"]["counts"]
    assert counts["responses"] == 108 and counts["desirable"] and counts["undesirable"]
    assert summary["ratings/desirable"] == counts["desirable"] and summary["ratings/ties"] == counts["ties"]
    assert not os.path.exists(os.path.join(arm_dir, "comparisons"))  # no pairwise critic
    assert summary["policy"] == os.path.join(arm_dir, "kto", "hf") and summary["kto/step"] > 0
    assert "kto/kl" in summary and "kto/rewards/margins" in summary
    assert "kto/make_optimizer.learning_rate = 0.0003" in open(os.path.join(arm_dir, "kto", "config.gin")).read()
    before = cache_sizes(world)
    configure(world, "kto", *bindings)
    run_arm()
    assert cache_sizes(world) == before and set(states(arm_dir).values()) == {"reused"}


def test_failed_stage_is_recorded_and_the_relaunch_resumes_there(world):
    arm_dir = configure(
        world,
        "sft_quarter",
        "run_arm.stages = ['prompts', 'sft', 'evaluate']",
        "run_arm.sft_fraction = 0.25",
        "run_arm.eval_set = '/nonexistent/eval.json'",
    )
    with pytest.raises(Exception, match="nonexistent"):
        run_arm()
    with open(os.path.join(arm_dir, "status.json")) as f:
        status = json.load(f)["stages"]
    assert status["sft"]["state"] == "done" and status["evaluate"]["state"] == "failed"
    assert "nonexistent" in status["evaluate"]["error"]
    # The first quarter of all prompts (SFT split, then feedback, in order): 15 of 60.
    data = os.path.join(world["root"], "data")
    order = [r["prompt_id"] for s in ("sft", "feedback") for r in read_records(os.path.join(data, "prompts", s))]
    kept = [r["prompt_id"] for r in read_records(os.path.join(arm_dir, "sft_data"))]
    assert kept == order[:15]

    configure(world, "sft_quarter", "run_arm.stages = ['prompts', 'sft', 'evaluate']", "run_arm.sft_fraction = 0.25")
    summary = run_arm()
    assert states(arm_dir) == {"prompts": "reused", "sft": "reused", "evaluate": "done"}
    assert summary["sft_data"] == "fraction 0.25" and "eval/win_rate" in summary


def test_fraction_zero_evaluates_the_base_model(world):
    arm_dir = configure(world, "base", "run_arm.stages = ['prompts', 'sft', 'evaluate']", "run_arm.sft_fraction = 0.0")
    summary = run_arm()
    assert summary["policy"] == world["base_model"]
    assert states(arm_dir)["sft"] == "skipped" and not os.path.exists(os.path.join(arm_dir, "sft"))
    with open(os.path.join(arm_dir, "eval", "metrics.json")) as f:
        assert json.load(f)["checkpoint"] == world["base_model"]


def test_teacher_stage_asks_each_teacher_in_its_own_scope(world):
    arm_dir = configure(
        world,
        "strong_sft",
        "run_arm.stages = ['prompts', 'teacher']",
        "run_arm.sft_teacher = 'strong-teacher'",
        "strong/teacher_stage.temperature = 0.0",
        "teacher_stage.temperature = 1.0",
    )
    run_arm()
    out = os.path.join(world["root"], "data", "teachers", "strong-teacher", "demonstrations", "sft")
    manifest = read_manifest(out)
    assert manifest["provenance"]["sampling"]["temperature"] == 0.0  # the teacher's scope, not the default
    demos = list(read_records(out))
    assert len(demos) == 6 and {d["source_model"] for d in demos} == {"strong-teacher"}
    assert states(arm_dir)["teacher"] == "done"


def test_teacher_completions_can_come_from_a_released_file(world, tmp_path):
    """The paper released its GPT-4 / Claude completions: an arm imports them (into the same
    layout the API path writes) instead of asking."""
    with open(world["prompts"]) as f:
        rows = json.load(f)
    released = tmp_path / "released.json"
    released.write_text(
        json.dumps(
            [
                {"instruction": r["instruction"], "output": "RELEASED " + r["output"], "generator": "released-gpt4"}
                for r in rows
            ]
        )
    )
    arm_dir = configure(
        world,
        "imported",
        "run_arm.stages = ['prompts', 'teacher']",
        "run_arm.sft_teacher = 'released-gpt4'",
        f"run_arm.teacher_imports = {{'released-gpt4': '{released}'}}",
    )
    run_arm()
    teacher = os.path.join(world["root"], "data", "teachers", "released-gpt4", "demonstrations")
    sft = list(read_records(os.path.join(teacher, "sft")))
    feedback = list(read_records(os.path.join(teacher, "feedback")))
    prompts = [r["prompt_id"] for r in read_records(os.path.join(world["root"], "data", "prompts", "sft"))]
    assert [d["prompt_id"] for d in sft] == prompts and len(feedback) == 54  # the same 10% / 90% split
    assert all(d["completion"].startswith("RELEASED ") for d in sft + feedback)
    assert states(arm_dir)["teacher"] == "done"


def test_ppo_arm_reuses_another_arms_sft_and_trains_its_reward_model_on_sample_pairs(world):
    """The paper PPO recipe's reward-model data (run_arm.rm_sample_pairs): the critic judges
    the SFT policy's sample against the teacher (DPO's pairs) and two samples of a prompt
    against each other; the reward model learns both, PPO climbs it."""
    # Runs after the DPO test in this module; on its own it builds what it needs first.
    dpo = os.path.join(world["root"], "dpo")
    if not os.path.exists(os.path.join(dpo, "summary.json")):
        configure(world, "dpo")
        run_arm()
    arm_dir = configure(
        world,
        "ppo",
        "run_arm.stages = ['samples', 'critic', 'preferences', 'reward_model', 'ppo', 'evaluate']",
        f"run_arm.stage_dirs = {{'sft': '{dpo}/sft'}}",
        "run_arm.rm_sample_pairs = True",
        "run_arm.rm_samples = 2",
        "train_ppo.num_iterations = 2",
        "train_ppo.config = @PPOConfig()",
        "PPOConfig.rollout_batch_size = 8",
        "PPOConfig.mini_batch_size = 4",
        "PPOConfig.max_new_tokens = 8",
        "PPOConfig.max_prompt_length = 32",
    )
    # The evaluation hook: the synthetic world's true task score of the PPO policy's answers.
    summary = run_arm(dataclasses.replace(ArmSettings(), eval_scores=task_accuracy))
    assert 0 <= summary["eval/task_score"] <= 100 and os.path.exists(os.path.join(arm_dir, "eval", "scores.json"))
    assert set(states(arm_dir).values()) == {"done"}
    assert summary["policy"] == os.path.join(arm_dir, "ppo", "hf")
    assert summary["ppo/iteration"] == 2 and "reward_model/accuracy" in summary
    assert not os.path.exists(os.path.join(arm_dir, "sft"))  # reused, not retrained
    # Sample 0 against the teacher, sample 0 against sample 1, each with the miniature's seed.
    teacher = list(read_records(os.path.join(arm_dir, "comparisons", "teacher-0")))
    between = list(read_records(os.path.join(arm_dir, "comparisons", "samples-0-1")))
    assert {c["model_2"] for c in teacher} == {"weak-teacher"} and len(between) == 54
    assert {c["model_1"] for c in between} == {c["model_2"] for c in between} == {"ppo/sft"}
    assert read_manifest(os.path.join(arm_dir, "comparisons", "samples-0-1"))["provenance"]["seed"] == 100
    # DPO's pairs are the teacher's alone; the reward model's add the decided sample pairs.
    with open(os.path.join(arm_dir, "status.json")) as f:
        assert json.load(f)["stages"]["reward_model"]["data"] == os.path.join(arm_dir, "preferences_rm")
    rm_pairs = read_manifest(os.path.join(arm_dir, "preferences_rm"))["num_records"]
    assert summary["reward_model/pairs"] == rm_pairs > summary["preferences/pairs"]
    assert read_manifest(os.path.join(arm_dir, "preferences_rm"))["provenance"]["comparisons"] == [
        os.path.join(arm_dir, "comparisons", "teacher-0"),
        os.path.join(arm_dir, "comparisons", "samples-0-1"),
    ]


def test_failed_api_requests_stop_the_arm_until_a_relaunch_gets_answers(world):
    """A wrong model name (or key, or quota) fails every critic request: the stage must not
    pass for done, or the relaunch would reuse an empty result."""
    dpo = os.path.join(world["root"], "dpo")
    if not os.path.exists(os.path.join(dpo, "summary.json")):
        configure(world, "dpo")
        run_arm()
    reuse = f"run_arm.stage_dirs = {{'sft': '{dpo}/sft', 'samples': '{dpo}/samples'}}"
    arm_dir = configure(
        world, "bad_critic", "run_arm.stages = ['critic']", reuse, "critic/FeedbackClient.model = 'no-such-critic'"
    )
    with pytest.raises(ArmError, match="critic: 54 of 54 API requests failed"):
        run_arm()
    assert not os.path.exists(os.path.join(arm_dir, "comparisons", "manifest.json"))
    assert states(arm_dir) == {"critic": "failed"}
    configure(world, "bad_critic", "run_arm.stages = ['critic']", reuse)
    summary = run_arm()
    assert states(arm_dir) == {"critic": "done"} and summary["critic/judged"] + summary["critic/invalid"] == 54


def test_judge_settings_bound_in_the_critic_scope_reach_the_critic_stage(world):
    """run_arm calls the critic stage inside gin scope `critic`, where it builds its
    JudgeSettings: a binding in that scope reaches it, one in another stage's does not."""
    dpo = os.path.join(world["root"], "dpo")
    if not os.path.exists(os.path.join(dpo, "summary.json")):
        configure(world, "dpo")
        run_arm()
    reuse = f"run_arm.stage_dirs = {{'sft': '{dpo}/sft', 'samples': '{dpo}/samples'}}"
    arm_dir = configure(
        world,
        "both_orders_critic",
        "run_arm.stages = ['critic']",
        reuse,
        "critic/JudgeSettings.both_orders = True",
        "evaluate/JudgeSettings.max_tokens = 1",
    )
    run_arm()
    out = os.path.join(arm_dir, "comparisons")
    prov = read_manifest(out)["provenance"]
    assert prov["both_orders"] is True and prov["max_tokens"] == 16 and prov["seed"] == 0  # seed: run_arm.seed
    with open(os.path.join(out, "comparisons.jsonl")) as f:
        comps = [json.loads(line) for line in f]
    assert len(comps) == 54 and all(len(c["views"]) == 2 for c in comps if not c.get("identical"))


@pytest.mark.parametrize(
    "bindings,match",
    [
        (["run_arm.stages = ['sft', 'sampels']"], "unknown stage.*sampels"),
        (["run_arm.stages = ['dpo', 'sft']"], "must follow the pipeline's order"),
        (
            ["run_arm.stages = ['prompts', 'teacher']", "run_arm.sft_teacher = 'gpt-5'"],
            "add 'gpt-5' to run_arm.teachers",
        ),
        (["run_arm.stages = ['dpo']"], "preference records not found"),
        (["run_arm.sft_fraction = 1.5"], r"sft_fraction must be in \[0, 1\]"),
        (["run_arm.stage_dirs = {'sfft': '/x'}"], r"stage_dirs: unknown stage\(s\) \['sfft'\]"),
    ],
)
def test_recipe_errors_name_the_binding(world, bindings, match):
    configure(world, "bad", *bindings)
    with pytest.raises(UserError, match=match):  # ArmError, or the runner's MissingInput
        run_arm()


@pytest.mark.parametrize("path", ARMS, ids=os.path.basename)
def test_paper_arms_resolve(path):
    """Each paper arm, with a model file, names valid stages and resolves every path and
    client binding it uses."""
    old = os.getcwd()
    os.chdir(ROOT)
    try:
        gin.parse_config_files_and_bindings(["configs/models/llama2_7b.gin", path], [], skip_unknown=False)
    finally:
        os.chdir(old)
    stages = gin.query_parameter("run_arm.stages")
    assert [s for s in stages if s in STAGES] == list(stages) and stages[-1] == "evaluate"
    assert gin.query_parameter("%ARM_DIR").startswith("runs/paper/arms/")
    assert gin.query_parameter("%HF_DIR") == "checkpoints/Llama-2-7b-hf"
    critic = gin.query_parameter("%CRITIC")
    assert critic in ("gpt-4-0314", "claude-v1")
    if "claude" in os.path.basename(path):
        assert gin.query_parameter("%JUDGE") == "claude-v1"
    if {"critic", "dpo", "ppo"} & set(stages) and "sft" in stages:
        assert gin.query_parameter("run_arm.evaluate_sft") is True
    if "reward_model" in stages:  # the miniature's reward-model data: sample-vs-sample pairs too
        assert gin.query_parameter("run_arm.rm_sample_pairs") is True and gin.query_parameter("run_arm.rm_samples") >= 2


def test_run_arm_script_runs_a_recipe(world, tmp_path):
    """scripts/run_arm.py with the tiny recipe: the gin path a user takes, in a fresh process."""
    arm_dir = str(tmp_path / "script_arm")
    cmd = [
        sys.executable,
        os.path.join(ROOT, "scripts", "run_arm.py"),
        f"--gin_file={TINY_ARM}",
        f"--gin_param=API_BASE='{world['url']}'",
        f"--gin_param=ARM_DIR='{arm_dir}'",
        f"--gin_param=DATA_DIR='{os.path.join(world['root'], 'data')}'",
        f"--gin_param=run_arm.prompt_source='{world['prompts']}'",
        "--gin_param=run_arm.stages=['prompts', 'teacher']",
    ]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert states(arm_dir) == {"prompts": "reused", "teacher": "reused"}
    bad = subprocess.run(
        cmd[:-1] + ["--gin_param=run_arm.stagez=['prompts']"], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert bad.returncode != 0 and "stagez" in bad.stderr


def test_two_process_arm_runs_api_and_sampling_stages_once(world, tmp_path):
    """Every worker of a slice runs the same arm: training spans both processes' devices,
    sampling splits the prompts over the hosts, and prompts, the critic and evaluation run
    once, on process 0."""
    port = free_port()
    spec = json.dumps(
        {
            "url": world["url"],
            "arm_dir": str(tmp_path / "arm"),
            "data_dir": str(tmp_path / "data"),
            "base_model": world["base_model"],
            "prompts": world["prompts"],
            "eval_set": world["eval_set"],
        }
    )
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2", PYTHONPATH=ROOT)
    worker = os.path.join(ROOT, "tests", "multiprocess_arm_worker.py")
    outs = run_together([[sys.executable, worker, spec, str(i), "2", port] for i in range(2)], env)
    assert "process 0 of 2 devices 4 done" in outs[0] and "process 1 of 2 devices 4 done" in outs[1]
    arm_dir = str(tmp_path / "arm")
    assert set(states(arm_dir).values()) == {"done", "reused"}
    summary = json.loads(outs[0].split(" done ", 1)[1].splitlines()[0])
    assert "eval/win_rate" in summary and summary["dpo/step"] > 0
    # Each request once: 54 critic judgments of the feedback prompts + 12 evaluation judgments.
    caches = str(tmp_path / "data" / "api_cache")
    assert {f: len(read_cache_lines(os.path.join(caches, f))) for f in os.listdir(caches) if f.endswith(".jsonl")} == {
        "critic.jsonl": 54,
        "judge.jsonl": 12,
    }
    # Record sets carry a shard per host, so each process trained on its own.
    for sub in ("data/prompts/sft", "arm/samples", "arm/preferences"):
        assert len(read_manifest(str(tmp_path / sub))["shards"]) == 2, sub
    # Each host sampled every other feedback prompt on its own devices; process 0 joined the
    # parts back into the prompts' order.
    order = [r["prompt_id"] for r in read_records(str(tmp_path / "data" / "prompts" / "feedback"))]
    parts = [
        [r["prompt_id"] for r in read_records(str(tmp_path / "arm" / "samples" / "parts" / f"host-00{i}-of-002"))]
        for i in range(2)
    ]
    assert parts == [order[0::2], order[1::2]]
    assert [r["prompt_id"] for r in read_records(str(tmp_path / "arm" / "samples"))] == order


def test_arm_on_an_object_store(world, memfs, memory_checkpoints, tmp_path, monkeypatch):
    """out_dir and data_dir on memory:// (the stand-in for gs://): records, reports, training
    runs and their exports land there; each stage hands the next its export through a local
    copy; the API caches stay on local disk."""
    monkeypatch.setenv("RLAIF_STAGING_DIR", str(tmp_path / "staging"))
    configure(
        world,
        "unused",
        "ARM_DIR = 'memory://bucket/arms/dpo'",
        "DATA_DIR = 'memory://bucket/data'",
        "run_arm.stages = ['prompts', 'sft', 'samples', 'critic', 'preferences', 'dpo', 'evaluate']",
    )
    summary = run_arm()
    store = {k.lstrip("/") for k in memfs.store}
    for f in (
        "bucket/data/stats.json",
        "bucket/data/prompts/feedback/manifest.json",
        "bucket/arms/dpo/sft/hf/EXPORT_COMPLETE.json",
        "bucket/arms/dpo/sft/metrics.jsonl",
        "bucket/arms/dpo/samples/manifest.json",
        "bucket/arms/dpo/comparisons/manifest.json",
        "bucket/arms/dpo/preferences/manifest.json",
        "bucket/arms/dpo/dpo/hf/EXPORT_COMPLETE.json",
        "bucket/arms/dpo/eval/metrics.json",
        "bucket/arms/dpo/summary.json",
        "bucket/arms/dpo/status.json",
    ):
        assert f in store, f
    assert summary["policy"] == "memory://bucket/arms/dpo/dpo/hf" and "eval/win_rate" in summary
    caches = os.listdir(str(tmp_path / "staging" / "api_cache"))
    assert len(caches) == 1  # one local cache directory for this data_dir
    assert not any(k.endswith("api_cache") for k in store)


def test_the_papers_rlaif_arm_runs_as_written(world, tmp_path):
    """configs/experiments/paper/arms/dpo_gpt4_on_sft_gpt35_10pct.gin, the paper's headline
    arm, end to end with only paths, sizes and the API address overridden: ShareGPT prompts
    (its replies the GPT-3.5 teacher), SFT on the first 10%, samples judged by "gpt-4-0314"
    (here the synthetic critic under that name), DPO, AlpacaEval-format evaluation."""
    from rlaif_jax.synthetic.backend import SyntheticBackend
    from rlaif_jax.synthetic.models import Critic

    with open(world["prompts"]) as f:
        rows = json.load(f)
    convs = [
        {
            "id": str(i),
            "conversations": [{"from": "human", "value": r["instruction"]}, {"from": "gpt", "value": r["output"]}],
        }
        for i, r in enumerate(rows)
    ]
    convs.append({"id": "x", "conversations": [{"from": "human", "value": "hi </s>"}, {"from": "gpt", "value": "y"}]})
    sharegpt = tmp_path / "sharegpt.json"
    sharegpt.write_text(json.dumps(convs))
    arm_dir = str(tmp_path / "arm")
    with ServerThread(make_app(SyntheticBackend({"gpt-4-0314": Critic()}))) as srv:
        old = os.getcwd()
        os.chdir(ROOT)
        try:
            gin.parse_config_files_and_bindings(
                ["configs/experiments/paper/arms/dpo_gpt4_on_sft_gpt35_10pct.gin"],
                [
                    "MODEL_CONFIG = None",
                    f"HF_DIR = '{world['base_model']}'",
                    f"ARM_DIR = '{arm_dir}'",
                    f"DATA_DIR = '{tmp_path / 'data'}'",
                    f"SHAREGPT_JSON = '{sharegpt}'",
                    f"ALPACA_EVAL_JSON = '{world['eval_set']}'",
                    f"CRITIC_URL = '{srv.url}'",
                    f"JUDGE_URL = '{srv.url}'",
                    "SFT_EPOCHS = 2",
                    "dpo/preference_pipeline.num_epochs = 1",
                    "make_mesh.data = -1",
                    "sft_pipeline.seq_len = 64",
                    "sft_pipeline.max_length = 64",
                    "sft_pipeline.max_prompt_length = 32",
                    "preference_pipeline.seq_len = 64",
                    "preference_pipeline.max_length = 64",
                    "preference_pipeline.max_prompt_length = 32",
                    "SamplingSettings.max_length = 64",
                    "SamplingSettings.max_prompt_length = 32",
                    "critic/critic_stage.truncate_max_length = 64",
                    "EvalSamplingSettings.max_length = 64",
                    "EvalSamplingSettings.max_prompt_length = 32",
                    "evaluate.lc_bootstrap = 0",
                ],
                skip_unknown=False,
            )
        finally:
            os.chdir(old)
        summary = run_arm()
    assert set(states(arm_dir).values()) <= {"done", "reused"}
    with open(tmp_path / "data" / "stats.json") as f:
        assert json.load(f)["dropped"] == {"special_token": 1}
    assert summary["prompts/sft"] == 6 and summary["sft_teacher"] == "sharegpt-chatgpt"
    assert {c["model_2"] for c in read_records(os.path.join(arm_dir, "comparisons"))} == {"sharegpt-chatgpt"}
    assert {c["judge"] for c in read_records(os.path.join(arm_dir, "comparisons"))} == {"gpt-4-0314"}
    # The paper's hyperparameters reached their stages.
    dpo_config = open(os.path.join(arm_dir, "dpo", "config.gin")).read()
    assert "DPO.beta = 0.05" in dpo_config and "dpo/make_optimizer.learning_rate = 1e-07" in dpo_config
    assert "make_optimizer.name = 'rmsprop'" in dpo_config
    for key in ("eval/win_rate", "eval_sft/win_rate", "critic/policy_preferred", "dpo/rewards/accuracies"):
        assert key in summary, key


def test_the_registry_declares_each_stage_once():
    """ARM_STAGES is the one declaration: the order, the host-0 stages, the output
    directories and the summary keys run_arm has always used follow from it."""
    from rlaif_jax.pipeline import ARM_STAGES
    from rlaif_jax.pipeline.order import OUTPUTS as _OUT

    assert STAGES == (
        "prompts",
        "teacher",
        "audit",
        "sft",
        "samples",
        "critic",
        "preferences",
        "dpo",
        "ratings",
        "kto",
        "rounds",
        "reward_model",
        "ppo",
        "evaluate",
    )
    assert [s.name for s in ARM_STAGES if s.host0] == [
        "prompts",
        "teacher",
        "audit",
        "critic",
        "preferences",
        "ratings",
        "evaluate",
    ]
    assert _OUT == {
        "audit": "audit",
        "sft_data": "sft_data",
        "sft": "sft",
        "samples": "samples",
        "critic": "comparisons",
        "preferences": "preferences",
        "rm_preferences": "preferences_rm",
        "dpo": "dpo",
        "ratings": "ratings",
        "labelled": "labelled",
        "kto": "kto",
        "rounds": "rounds",
        "reward_model": "reward_model",
        "ppo": "ppo",
        "evaluate": "eval",
        "evaluate_sft": "eval_sft",
    }
    assert {s.name: s.summary_keys for s in ARM_STAGES if s.summary_keys} == {
        "sft": ("step", "loss"),
        "dpo": ("step", "loss", "rewards/accuracies", "rewards/margins"),
        "kto": ("step", "loss", "kl", "rewards/chosen", "rewards/rejected", "rewards/margins"),
        "reward_model": ("step", "loss", "accuracy", "eval/accuracy"),
        "ppo": ("iteration", "objective/scores", "objective/kl", "objective/rlhf_reward"),
    }
