"""Teacher -> critic -> preferences stages writing record sets, a kill -9 mid-run that
resumes to the same records, and the API key never reaching any output."""

import json
import logging
import os
import signal
import subprocess
import time

import pytest

from rlaif_jax.data.records import (
    COMPARISONS,
    DEMONSTRATIONS,
    PREFERENCES,
    PROMPTS,
    read_manifest,
    read_records,
    write_records,
)
from rlaif_jax.feedback.cache import read_cache_lines
from rlaif_jax.feedback.server.testing import EchoTeacher, FaultInjector, RuleJudge
from rlaif_jax.feedback.settings import JudgeSettings
from rlaif_jax.feedback.stages import critic_stage, preferences_stage, teacher_stage

from .conftest import KEY_ENV, SECRET, make_client, stage_cmd, write_prompts_jsonl


def _all_output_text(root):
    for dirpath, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(dirpath, name), "rb") as f:
                yield os.path.join(dirpath, name), f.read()


def test_teacher_critic_preferences_end_to_end_and_no_key_anywhere(serve, tmp_path, api_key, caplog, capfd):
    caplog.set_level(logging.DEBUG)
    faults = FaultInjector(retry_after_s=0.01)
    teacher_srv = serve(EchoTeacher(["teacher"]), faults)
    judge_srv = serve(RuleJudge(["judge"]), FaultInjector(retry_after_s=0.01))
    texts = [f"GOOD question {i}" for i in range(10)] + [
        "a long one [[long]]",
        "bad [[fault:400]]",
        "no key [[fault:401]]",
        "flaky [[fault:429x1]]",
    ]
    # prompts as a PROMPTS record set, as the data stage writes them
    from rlaif_jax.data.ids import prompt_id

    prompts_dir = tmp_path / "prompts"
    write_records(
        prompts_dir,
        PROMPTS,
        [
            {"prompt_id": prompt_id(t), "prompt": t, "source": "test", "index": i, "split": "feedback"}
            for i, t in enumerate(texts)
        ],
    )
    teacher = make_client(teacher_srv, tmp_path, model="teacher", cache="api/teacher.jsonl")
    m = teacher_stage(
        prompts=str(prompts_dir), out_dir=str(tmp_path / "teacher"), client=teacher, temperature=0.7, max_tokens=64
    )
    demos = list(read_records(tmp_path / "teacher", DEMONSTRATIONS))
    assert m["num_records"] == len(demos) == 11  # 14 - length - 400 - 401
    assert all(d["finish_reason"] == "stop" and d["completion"].startswith("Answer to: ") for d in demos)
    report = json.load(open(tmp_path / "teacher" / "report.json"))
    assert report["dropped"] == {"finish_reason=length": 1} and report["request_errors"] == 2
    errors = [json.loads(line) for line in open(tmp_path / "teacher" / "errors.jsonl")]
    assert sorted(e["kind"] for e in errors) == ["http_400", "http_401"]
    prov = read_manifest(tmp_path / "teacher")["provenance"]
    assert prov["client"]["api_key_env"] == KEY_ENV and prov["report"]["api"]["retries"] == 1

    # "policy samples": the same prompts with weaker answers (no GOOD), as a JSONL file
    policy = tmp_path / "policy.jsonl"
    with open(policy, "w") as f:
        for d in demos:
            f.write(
                json.dumps({**d, "completion": "a weak policy sample that rambles on and on", "source_model": "policy"})
                + "\n"
            )
    # the teacher's answers contain GOOD (copied from the prompt): the rule judge prefers them
    judge = make_client(judge_srv, tmp_path, model="judge", cache="api/judge.jsonl")
    critic_stage(
        responses_1=str(policy),
        responses_2=str(tmp_path / "teacher"),
        out_dir=str(tmp_path / "critic"),
        client=judge,
        judge=JudgeSettings(seed=0),
    )
    comps = list(read_records(tmp_path / "critic", COMPARISONS))
    assert len(comps) == 11 and {c["swapped"] for c in comps} == {0, 1}
    good = [c for c in comps if "GOOD" in c["response_2"]]
    assert good and all(c["verdict"] == "second" for c in good)
    crep = json.load(open(tmp_path / "critic" / "report.json"))
    assert crep["join"] == {"only_in_first": 0, "only_in_second": 0, "paired": 11}
    assert read_manifest(tmp_path / "critic")["provenance"]["template"].startswith("pairwise_v1@")

    preferences_stage(comparisons=[str(tmp_path / "critic")], out_dir=str(tmp_path / "prefs"))
    prefs = list(read_records(tmp_path / "prefs", PREFERENCES))
    assert len(prefs) == 11 - sum(c["verdict"] not in ("first", "second") for c in comps)
    assert all(p["chosen"] != p["rejected"] for p in prefs)
    assert all("rejected=policy" in p["provenance"] for p in prefs if "GOOD" in p["chosen"])

    # the key: not in any file written, nor in any log line or console output
    out, err = capfd.readouterr()
    for path, data in _all_output_text(tmp_path):
        assert SECRET.encode() not in data, path
    assert SECRET not in caplog.text and SECRET not in out and SECRET not in err
    assert any("401" in r.getMessage() for r in caplog.records)  # the 401 was logged, scrubbed


def test_kill_9_mid_run_resumes_to_the_same_records(serve, tmp_path, api_key):
    texts = [f"question {i}" + (" [[long]]" if i % 7 == 0 else "") for i in range(80)]
    prompts = write_prompts_jsonl(tmp_path / "prompts.jsonl", texts)
    faults = FaultInjector()
    srv = serve(EchoTeacher(["teacher"], latency_s=0.04), faults)
    cache = tmp_path / "api" / "teacher.jsonl"
    env = {**os.environ, KEY_ENV: SECRET, "JAX_PLATFORMS": "cpu"}
    cmd = stage_cmd(prompts, tmp_path / "out", cache, srv.url)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        if cache.exists() and sum(1 for _ in open(cache, "rb")) >= 15:
            break
        time.sleep(0.01)
    assert proc.poll() is None, "the run finished before it could be killed: " + proc.stderr.read().decode()[-2000:]
    proc.send_signal(signal.SIGKILL)
    _, err1 = proc.communicate()
    done_before = {r["key"] for r in read_cache_lines(cache)}
    assert 15 <= len(done_before) < 80
    assert not (tmp_path / "out" / "manifest.json").exists()
    sent_before = len(faults.log)

    res = subprocess.run(cmd, env=env, capture_output=True, timeout=120)
    assert res.returncode == 0, res.stderr.decode()[-3000:]
    # The rerun sent exactly what the cache lacked; only requests in flight at the kill
    # (at most max_concurrency=2, answered but never recorded) were paid for twice.
    assert len(faults.log) - sent_before == 80 - len(done_before)
    paid = faults.paid()
    assert len(paid) == 80 and sum(n - 1 for n in paid.values()) <= 2
    resumed = list(read_records(tmp_path / "out", DEMONSTRATIONS))

    # the same stage uninterrupted, in another directory against a fresh server
    ref_srv = serve(EchoTeacher(["teacher"]))
    ref = subprocess.run(
        stage_cmd(prompts, tmp_path / "ref", tmp_path / "api" / "ref.jsonl", ref_srv.url),
        env=env,
        capture_output=True,
        timeout=120,
    )
    assert ref.returncode == 0, ref.stderr.decode()[-3000:]
    assert resumed == list(read_records(tmp_path / "ref", DEMONSTRATIONS))
    assert len(resumed) == 80 - len([t for t in texts if "[[long]]" in t])
    # no key in the saved config, the logs, or any file
    assert (tmp_path / "out" / "operative_config.gin").exists()
    for path, data in _all_output_text(tmp_path):
        assert SECRET.encode() not in data, path
    for blob in (err1, res.stdout, res.stderr, ref.stderr):
        assert SECRET.encode() not in blob


def test_truncate_to_the_policy_budget(tmp_path):
    from rlaif_jax.data.tokenize import build_test_tokenizer
    from rlaif_jax.feedback.judge import PairTask
    from rlaif_jax.feedback.stages import truncate_to_budget

    tok = build_test_tokenizer(tmp_path / "tok")
    prompt = "What is the capital of France?"
    n_prompt = 1 + len(tok(f"Human: {prompt}\n\nAssistant: ", add_special_tokens=False)["input_ids"])
    long = " ".join(["the sea is blue and wide"] * 10)
    tasks = [PairTask("p", prompt, "The capital of France is Paris.", long)]
    (t,), n_cut = truncate_to_budget(tasks, tok, max_length=n_prompt + 12)
    assert n_cut == 1 and t.response_1 == tasks[0].response_1
    assert len(tok(t.response_2, add_special_tokens=False)["input_ids"]) == 12 and long.startswith(t.response_2)


# -- bad input never passes silently, good data is never replaced by less --------------------


def _records_and_sidecars(out):
    return {p: d for p, d in _all_output_text(out) if not p.endswith(".writer.lock")}


def _teacher_set(tmp_path, serve, n_prompts=4):
    """A complete teacher set of n_prompts records in tmp_path/out, and the server that made it."""
    faults = FaultInjector()
    srv = serve(EchoTeacher(["teacher"]), faults)
    prompts = write_prompts_jsonl(tmp_path / "good.jsonl", [f"q{i}" for i in range(n_prompts)])
    with make_client(srv, tmp_path) as c:
        teacher_stage(prompts=prompts, out_dir=str(tmp_path / "out"), client=c)
    return srv, faults


def test_an_empty_prompt_file_is_an_error_and_keeps_the_existing_set(serve, tmp_path, api_key):
    from rlaif_jax.errors import UserError

    srv, faults = _teacher_set(tmp_path, serve)
    before = _records_and_sidecars(tmp_path / "out")
    sent = len(faults.log)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with make_client(srv, tmp_path) as c:
        with pytest.raises(UserError, match=r"teacher_stage.prompts = '.*empty.jsonl': holds no prompts"):
            teacher_stage(prompts=str(empty), out_dir=str(tmp_path / "out"), client=c)
        # a split nobody is in: the same, naming the split binding
        with pytest.raises(UserError, match=r"none of its 4 prompts is in split 'feedback'; set teacher_stage.split"):
            teacher_stage(
                prompts=str(tmp_path / "good.jsonl"), out_dir=str(tmp_path / "out"), client=c, split="feedback"
            )
    assert len(faults.log) == sent
    assert _records_and_sidecars(tmp_path / "out") == before


def test_a_run_that_can_only_shrink_a_complete_set_is_refused_before_paying(serve, tmp_path, api_key):
    from rlaif_jax.outputs import OutputWouldShrinkError

    srv, faults = _teacher_set(tmp_path, serve, n_prompts=4)
    fewer = write_prompts_jsonl(tmp_path / "fewer.jsonl", ["q0", "a new one"])
    sent = len(faults.log)
    with make_client(srv, tmp_path) as c:
        with pytest.raises(OutputWouldShrinkError, match=r"4 records .* with 2; .*teacher_stage.overwrite=True"):
            teacher_stage(prompts=fewer, out_dir=str(tmp_path / "out"), client=c)
        assert len(faults.log) == sent  # refused before a request
        assert read_manifest(tmp_path / "out")["num_records"] == 4
        m = teacher_stage(prompts=fewer, out_dir=str(tmp_path / "out"), client=c, overwrite=True)
    assert m["num_records"] == 2 and len(faults.log) == sent + 1  # q0 came from the cache


def test_a_second_writer_on_the_same_out_dir_pays_for_nothing(serve, tmp_path, api_key):
    from rlaif_jax.outputs import OutputInUseError, writer_lock

    faults = FaultInjector()
    srv = serve(EchoTeacher(["teacher"]), faults)
    prompts = write_prompts_jsonl(tmp_path / "p.jsonl", ["a", "b"])
    # The lock is an flock on a file description of its own, so holding it here stands for
    # another live process (tests/test_errors.py checks across processes).
    with writer_lock(str(tmp_path / "out"), "teacher_stage.out_dir"):
        with make_client(srv, tmp_path, cache="second.jsonl") as c:
            with pytest.raises(OutputInUseError, match=r"being written by pid \d+ .*another teacher_stage.out_dir"):
                teacher_stage(prompts=prompts, out_dir=str(tmp_path / "out"), client=c)
    assert faults.log == []
    assert not (tmp_path / "out" / "manifest.json").exists()


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(n=0), r"teacher_stage.n = 0: must be a whole number >= 1"),
        (dict(max_tokens=2.5), r"teacher_stage.max_tokens = 2.5: must be a whole number"),
        (dict(limit=0), r"teacher_stage.limit = 0: must be a whole number >= 1"),
        (dict(num_shards=0), r"teacher_stage.num_shards = 0"),
        (dict(temperature=-0.1), r"teacher_stage.temperature = -0.1: must be >= 0"),
        (dict(top_p=0.0), r"teacher_stage.top_p = 0.0: must be in \(0.0, 1.0\]"),
        (dict(top_p=1.5), r"teacher_stage.top_p = 1.5"),
        (dict(prompts="missing.jsonl"), r"teacher_stage.prompts = 'missing.jsonl': no such"),
    ],
)
def test_teacher_settings_are_checked_before_any_work(serve, tmp_path, api_key, kw, match):
    from rlaif_jax.errors import ConfigError

    faults = FaultInjector()
    srv = serve(EchoTeacher(["teacher"]), faults)
    args = dict(prompts=write_prompts_jsonl(tmp_path / "p.jsonl", ["a"]), out_dir=str(tmp_path / "out"))
    with make_client(srv, tmp_path) as c:
        with pytest.raises(ConfigError, match=match):
            teacher_stage(client=c, **{**args, **kw})
    assert faults.log == [] and not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "stage, kw, match",
    [
        ("critic", dict(mode="ranking"), r"JudgeSettings.mode = 'ranking': must be one of"),
        ("critic", dict(max_tokens=0), r"JudgeSettings.max_tokens = 0"),
        ("critic", dict(on_disagreement="coin"), r"JudgeSettings.on_disagreement"),
        ("critic", dict(responses_1="nope"), r"critic_stage.responses_1 = 'nope': no such"),
        ("preferences", dict(min_confidence=1.5), r"preferences_stage.min_confidence = 1.5: must be in \[0.0, 1.0\]"),
        ("preferences", dict(comparisons=[]), r"preferences_stage.comparisons is empty"),
        ("samples", dict(top_p=0.0), r"SamplingSettings.top_p = 0.0"),
        ("samples", dict(batch_size=0), r"SamplingSettings.batch_size = 0"),
        ("samples", dict(max_prompt_length=64, max_length=64), r"SamplingSettings.max_prompt_length = 64 leaves"),
        ("samples", dict(hf_dir="no/such/ckpt"), r"policy_samples_stage.hf_dir = 'no/such/ckpt': no such"),
    ],
)
def test_other_stage_settings_are_checked_before_any_work(tmp_path, clean_gin, stage, kw, match):
    import gin

    from rlaif_jax.errors import ConfigError
    from rlaif_jax.feedback.settings import SamplingSettings
    from rlaif_jax.feedback.stages import policy_samples_stage

    # The judge's and the sampler's settings are values, checked as they are made (from
    # gin inside the stage); the stage's own arguments are checked by the stage.
    kw = dict(kw)
    settings = {"critic": JudgeSettings, "samples": SamplingSettings}.get(stage)
    for name in [k for k in kw if settings and k in settings.__dataclass_fields__]:
        gin.bind_parameter(f"{settings.__name__}.{name}", kw.pop(name))
    demos = tmp_path / "d.jsonl"
    demos.write_text(json.dumps({"prompt_id": "p", "prompt": "x", "completion": "y"}) + "\n")
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text("{}")
    out = str(tmp_path / "out")
    with pytest.raises(ConfigError, match=match):
        if stage == "critic":
            critic_stage(**{**dict(responses_1=str(demos), responses_2=str(demos), out_dir=out, client=None), **kw})
        elif stage == "preferences":
            preferences_stage(**{**dict(comparisons=[str(demos)], out_dir=out), **kw})
        else:
            policy_samples_stage(**{**dict(hf_dir=str(ckpt), prompts=str(demos), out_dir=out), **kw})
    assert not os.path.exists(out)


def test_judge_settings_come_from_gin_in_the_callers_scope(serve, tmp_path, api_key, clean_gin):
    """A stage given no JudgeSettings builds them from gin where it is called, so run_arm's
    `critic/JudgeSettings.*` reach the critic stage (called in scope `critic`) only."""
    import gin

    from rlaif_jax.errors import ConfigError

    srv = serve(RuleJudge(["judge"]))
    sets = {}
    for side, text in (("1", "a weak answer"), ("2", "a GOOD answer")):
        sets[side] = tmp_path / f"r{side}.jsonl"
        sets[side].write_text(
            "".join(json.dumps({"prompt_id": f"p{i}", "prompt": f"q{i}", "completion": text}) + "\n" for i in range(3))
        )
    gin.parse_config(
        [
            "critic/JudgeSettings.both_orders = True",
            "JudgeSettings.max_tokens = 8",
            "evaluate/JudgeSettings.logprobs = True",
        ]
    )
    with make_client(srv, tmp_path, model="judge") as c:

        def run(scope, out):
            with gin.config_scope(scope):
                critic_stage(
                    responses_1=str(sets["1"]), responses_2=str(sets["2"]), out_dir=str(tmp_path / out), client=c
                )
            return read_manifest(tmp_path / out)["provenance"]

        critic, other = run("critic", "critic"), run("samples", "other")
        assert (critic["both_orders"], critic["max_tokens"], critic["logprobs"]) == (True, 8, False)
        assert (other["both_orders"], other["max_tokens"], other["logprobs"]) == (False, 8, False)
        gin.parse_config(["critic/JudgeSettings.max_tokens = 0"])
        with pytest.raises(ConfigError, match=r"^critic/JudgeSettings.max_tokens = 0: must be a whole number"):
            run("critic", "bad")
    assert not (tmp_path / "bad").exists()


def test_prompt_files_that_are_not_utf8_or_not_objects_name_file_and_line(tmp_path):
    from rlaif_jax.errors import UserError
    from rlaif_jax.feedback.stages import load_prompts

    latin1 = tmp_path / "latin1.jsonl"
    latin1.write_bytes(b'{"prompt": "ok"}\n{"prompt": "caf\xe9"}\n')
    with pytest.raises(UserError, match=r"latin1.jsonl: line 2 \(byte 32\) is not UTF-8 .*save the file as UTF-8"):
        load_prompts(str(latin1))
    arrays = tmp_path / "arrays.jsonl"
    arrays.write_text('{"prompt": "ok"}\n\n["not", "an", "object"]\n')
    with pytest.raises(
        UserError,
        match=r"arrays.jsonl: line 3 is a JSON array, expected an object with a 'prompt' "
        r"string",
    ):
        load_prompts(str(arrays))
    scalar = tmp_path / "scalar.jsonl"
    scalar.write_text('"just a string"\n')
    with pytest.raises(UserError, match=r"scalar.jsonl: line 1 is a JSON string, expected an object"):
        load_prompts(str(scalar))
    # a byte-order mark (Windows editors) is not an error
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b'\xef\xbb\xbf{"prompt": "hi"}\n')
    assert [r["prompt"] for r in load_prompts(str(bom))] == ["hi"]
