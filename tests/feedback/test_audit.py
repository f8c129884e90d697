"""The teacher-critic gap audit (rlaif_jax.feedback.audit) in the synthetic world, over the
real client and the OpenAI-compatible server on 127.0.0.1: it finds a planted gap (weak vs
strong teacher), finds none between equally strong teachers (even with a critic that
mostly answers "Output (a)", since it asks in both orders), prices its requests before
sending them, and refuses bad input with one line."""

import json
import os

import gin
import pytest

from rlaif_jax.errors import ConfigError, UserError
from rlaif_jax.feedback.audit import AuditSettings, audit_gap, gap_statistics, reading
from rlaif_jax.feedback.cache import read_cache_lines
from rlaif_jax.feedback.client import FeedbackClient
from rlaif_jax.feedback.server import ServerThread, make_app
from rlaif_jax.feedback.settings import JudgeSettings
from rlaif_jax.feedback.stages import teacher_stage
from rlaif_jax.synthetic.backend import SyntheticBackend
from rlaif_jax.synthetic.models import Critic, Teacher
from rlaif_jax.synthetic.tasks import make_instructions
from tests.feedback.conftest import write_prompts_jsonl

N = 60
TEACHERS = {"weak-teacher": 0.4, "strong-teacher": 0.9, "peer-a": 0.6, "peer-b": 0.6}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Four teachers' completions of the same 60 prompts, and the server that made them (also
    serving a fair critic, the miniature's, and one that says "Output (a)" 60% of the time)."""
    root = tmp_path_factory.mktemp("audit_world")
    models = {name: Teacher(s) for name, s in TEACHERS.items()}
    models["critic"] = Critic(strength=1.0, noise=0.1, position_bias=0.2)
    models["biased-critic"] = Critic(strength=1.0, noise=0.1, position_bias=0.6)
    prompts = write_prompts_jsonl(root / "prompts.jsonl", make_instructions(N, seed=0))
    with ServerThread(make_app(SyntheticBackend(models))) as srv:
        dirs = {}
        for name in TEACHERS:
            dirs[name] = str(root / name)
            teacher_stage(prompts=prompts, out_dir=dirs[name], client=client(srv.url, root, name), temperature=0.0)
        yield {"root": root, "url": srv.url, "dirs": dirs}


def client(url, root, model, **kw):
    return FeedbackClient(
        model=model,
        cache_path=str(root / f"{model}.jsonl"),
        base_url=url,
        api_key_env="RLAIF_TEST_NO_KEY",
        progress=False,
        **kw,
    )


def audit(world, teacher, strong, out, critic="critic", sample_size=N, **kw):
    return audit_gap(
        teacher=world["dirs"][teacher],
        strong=world["dirs"][strong],
        out_dir=str(world["root"] / out),
        client=client(world["url"], world["root"], critic, prices={critic: (2.0, 4.0)}),
        judge=JudgeSettings(),
        settings=AuditSettings(sample_size=sample_size, **kw),
    )


def test_a_planted_gap_is_found_and_read_as_the_papers_artefact(world, capsys):
    r = audit(world, "weak-teacher", "strong-teacher", "gap")
    assert r["reading"] == "gap" and r["ci_low"] > 50.0 and r["strong_preferred"] > 65.0
    assert r["teacher_model"] == "weak-teacher" and r["strong_model"] == "strong-teacher"
    assert r["n_scored"] + r["statistics"]["n_invalid"] == N and "Distil the strong model first" in r["reading_text"]
    # The cost was printed before anything was sent: 2 orders per pair that is not identical.
    est = r["cost"]["estimate"]
    sent = N - r["statistics"]["n_identical"]
    assert est["requests"] == 2 * sent and est["to_send"] == 2 * sent and est["usd_max"] > 0
    assert f"{2 * sent} to send: at most $" in capsys.readouterr().out
    comps = [json.loads(line) for line in open(world["root"] / "gap" / "comparisons.jsonl")]
    assert all(len(c["views"]) == 2 for c in comps if not c.get("identical"))
    assert {c["model_1"] for c in comps} == {"weak-teacher"}
    md = open(world["root"] / "gap" / "report.md").read()
    assert "**Reading: gap.**" in md and "jax" in md
    # A rerun asks nothing again and reads the same: the judgments in out_dir were asked the
    # same way, so not even the cache is consulted (another cache would pay nothing either).
    again = audit(world, "weak-teacher", "strong-teacher", "gap")
    assert again["cost"]["estimate"]["requests"] == 0 and again["kept_from_out_dir"] == N
    assert again["cost"]["api"]["requests"] == 0 and again["cost"]["api"]["cached"] == 0
    assert again["strong_preferred"] == r["strong_preferred"]
    # Without the record of how they were asked, nothing is reused (asked again, from the cache).
    os.remove(world["root"] / "gap" / "judge_asked.json")
    anew = audit(world, "weak-teacher", "strong-teacher", "gap")
    assert anew["kept_from_out_dir"] == 0 and anew["cost"]["api"]["cached"] == 2 * sent


def test_equally_strong_teachers_show_no_gap(world, tmp_path):
    """Two teachers of the same strength (0.6), in four worlds of 60 prompts each, audited by
    the fair critic and by one that says "Output (a)" 60% of the time. The audit tests the
    two completion sets, so sets that differ by chance can read "gap" (the 60 prompts of
    seed 0 do: peer-b's completions score 0.77 against peer-a's 0.69, and the fair critic
    finds 58.3%, interval 50.5-66.1); over the worlds the readings centre on 50% and rarely
    claim a gap, and the position bias does not create one."""
    readings, rates = [], []
    for seed in range(4):
        root = tmp_path / f"world{seed}"
        prompts = write_prompts_jsonl(tmp_path / f"prompts{seed}.jsonl", make_instructions(N, seed=100 + seed))
        sets = {}
        for name in ("peer-a", "peer-b"):
            sets[name] = str(root / name)
            teacher_stage(prompts=prompts, out_dir=sets[name], client=client(world["url"], root, name), temperature=0.0)
        for critic in ("critic", "biased-critic"):
            r = audit_gap(
                teacher=sets["peer-a"],
                strong=sets["peer-b"],
                out_dir=str(root / critic),
                client=client(world["url"], root, critic),
                judge=JudgeSettings(),
                settings=AuditSettings(sample_size=N),
            )
            readings.append(r["reading"])
            rates.append(r["strong_preferred"])
    assert readings.count("gap") + readings.count("reversed") <= 1, (readings, rates)
    assert 45.0 < sum(rates) / len(rates) < 55.0, rates
    assert "does not show here" in r["reading_text"] or r["reading"] != "no_gap"


def test_the_sample_is_seeded_and_the_cost_limit_holds(world):
    a = audit(world, "weak-teacher", "strong-teacher", "s1", sample_size=20, seed=1)
    b = audit(world, "weak-teacher", "strong-teacher", "s1b", sample_size=20, seed=1)
    ids = lambda out: [json.loads(x)["prompt_id"] for x in open(world["root"] / out / "comparisons.jsonl")]
    assert a["join"]["sampled"] == b["join"]["sampled"] == 20 and ids("s1") == ids("s1b")
    cache = world["root"] / "critic.jsonl"
    before = len(read_cache_lines(str(cache)))
    with pytest.raises(UserError, match=r"AuditSettings.max_cost_usd = 0.0: the audit would cost at most \$"):
        audit(world, "peer-a", "strong-teacher", "limited", sample_size=30, max_cost_usd=0.0)
    assert len(read_cache_lines(str(cache))) == before  # nothing sent
    assert not os.path.exists(world["root"] / "limited" / "metrics.json")


def test_statistics_and_reading():
    comps = [{"verdict": "second"}] * 70 + [{"verdict": "first"}] * 30
    s = gap_statistics(comps)
    assert s["strong_preferred"] == 70.0 and s["ci_low"] == pytest.approx(70 - 1.959964 * s["standard_error"])
    assert reading(s)[0] == "gap"
    assert reading(gap_statistics([{"verdict": "second"}] * 30 + [{"verdict": "first"}] * 70))[0] == "reversed"
    even = [{"verdict": "tie"}] * 2 + [{"verdict": "second"}, {"verdict": "first"}]
    assert reading(gap_statistics(even))[0] == "no_gap"
    assert reading(gap_statistics([{"verdict": "invalid"}] * 3))[0] == "undecided"


def test_bad_input_is_one_line(world, tmp_path):
    with pytest.raises(ConfigError, match="AuditSettings.sample_size = 0: must be a whole number >= 1"):
        AuditSettings(sample_size=0)
    with pytest.raises(ConfigError, match="audit_gap.strong = '/nonexistent': no such demonstration set"):
        audit_gap(
            teacher=world["dirs"]["peer-a"],
            strong="/nonexistent",
            out_dir=str(tmp_path / "x"),
            client=client(world["url"], tmp_path, "critic"),
            judge=JudgeSettings(),
            settings=AuditSettings(),
        )
    other = write_prompts_jsonl(tmp_path / "other.jsonl", [])
    with open(other, "w") as f:
        f.write(json.dumps({"prompt_id": "nope", "prompt": "p", "completion": "c"}) + "\n")
    with pytest.raises(UserError, match="share no prompt_id"):
        audit_gap(
            teacher=world["dirs"]["peer-a"],
            strong=other,
            out_dir=str(tmp_path / "y"),
            client=client(world["url"], tmp_path, "critic"),
            judge=JudgeSettings(),
            settings=AuditSettings(),
        )
    with pytest.raises(ConfigError, match="use 'pairwise'"):
        audit_gap(
            teacher=world["dirs"]["peer-a"],
            strong=world["dirs"]["peer-b"],
            out_dir=str(tmp_path / "z"),
            client=client(world["url"], tmp_path, "critic"),
            judge=JudgeSettings(mode="rating"),
            settings=AuditSettings(),
        )


@pytest.mark.usefixtures("clean_gin")
def test_script_reports_and_fails_with_one_line(world, tmp_path, capsys):
    from rlaif_jax.cli import run
    from scripts.audit_gap import main

    common = [
        f"--gin_param=audit_gap.teacher='{world['dirs']['weak-teacher']}'",
        f"--gin_param=audit_gap.out_dir='{tmp_path / 'script'}'",
        "--gin_param=audit_gap.client=@FeedbackClient()",
        "--gin_param=FeedbackClient.model='critic'",
        f"--gin_param=FeedbackClient.base_url='{world['url']}'",
        f"--gin_param=FeedbackClient.cache_path='{tmp_path / 'cache.jsonl'}'",
        "--gin_param=FeedbackClient.api_key_env='RLAIF_TEST_NO_KEY'",
        "--gin_param=FeedbackClient.progress=False",
        "--gin_param=AuditSettings.sample_size=40",
    ]
    assert run(main, common + [f"--gin_param=audit_gap.strong='{world['dirs']['strong-teacher']}'"]) == 0
    out = capsys.readouterr().out
    assert "unpriced model" in out and "strong preferred" in out and ": gap" in out
    gin.clear_config()  # the script finalized (locked) it
    assert run(main, common + ["--gin_param=audit_gap.strong='/no/such/dir'"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: audit_gap.strong = '/no/such/dir'")


@pytest.mark.usefixtures("clean_gin")
def test_arm_audits_before_training_and_a_relaunch_reuses_it(world, tmp_path):
    """run_arm with the optional 'audit' stage (prompts -> teacher -> audit): the teacher
    stage fetches both models' completions of the audited split, the critic compares them
    through its own cache role, and the reading lands in the arm's summary."""
    import random

    from rlaif_jax.pipeline import ArmError, run_arm

    rng = random.Random(0)
    source = tmp_path / "prompts.json"
    source.write_text(
        json.dumps(
            [
                {
                    "instruction": t,
                    "output": Teacher(TEACHERS["weak-teacher"]).answer(t, rng),
                    "generator": "weak-teacher",
                }
                for t in make_instructions(N, seed=0)
            ]
        )
    )
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    arm_dir, data_dir = str(tmp_path / "arm"), str(tmp_path / "data")

    def configure(*bindings):
        gin.clear_config()
        gin.parse_config_files_and_bindings(
            [os.path.join(root, "configs", "experiments", "tiny_arm.gin")],
            [
                f"API_BASE = '{world['url']}'",
                f"ARM_DIR = '{arm_dir}'",
                f"DATA_DIR = '{data_dir}'",
                f"run_arm.prompt_source = '{source}'",
                "run_arm.stages = ['prompts', 'teacher', 'audit']",
                "audit/AuditSettings.split = 'feedback'",
                "audit/AuditSettings.sample_size = 40",
                *bindings,
            ],
            skip_unknown=False,
        )

    configure()
    with pytest.raises(ArmError, match="the audit stage needs run_arm.audit_against"):
        run_arm()
    configure("run_arm.audit_against = 'strong-teacher'")
    summary = run_arm()
    assert summary["audit/reading"] == "gap" and summary["audit/ci_low"] > 50.0 and summary["audit/n_scored"] == 40
    with open(os.path.join(arm_dir, "status.json")) as f:
        assert json.load(f)["stages"]["audit"]["state"] == "done"
    with open(os.path.join(arm_dir, "audit", "metrics.json")) as f:
        report = json.load(f)
    assert report["teacher_model"] == "weak-teacher" and report["strong_model"] == "strong-teacher"
    assert report["settings"]["split"] == "feedback" and report["judge"]["both_orders"] is True
    cache = os.path.join(data_dir, "api_cache", "audit.jsonl")
    before = len(read_cache_lines(cache))
    configure("run_arm.audit_against = 'strong-teacher'")
    again = run_arm()
    assert len(read_cache_lines(cache)) == before
    assert again["audit/strong_preferred"] == summary["audit/strong_preferred"]
    with open(os.path.join(arm_dir, "status.json")) as f:
        assert json.load(f)["stages"]["audit"]["state"] == "reused"
