"""Teacher -> critic -> preferences stages writing record sets, a kill -9 mid-run that
resumes to the same records, and the API key never reaching any output."""

import json
import logging
import os
import signal
import subprocess
import sys
import time


from rlaif_jax.data.records import COMPARISONS, DEMONSTRATIONS, PREFERENCES, PROMPTS, read_manifest, read_records, write_records
from rlaif_jax.feedback.cache import read_cache_lines
from rlaif_jax.feedback.server.testing import EchoTeacher, FaultInjector, RuleJudge
from rlaif_jax.feedback.stages import critic_stage, preferences_stage, teacher_stage

from .conftest import KEY_ENV, SECRET, make_client

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _write_prompts_jsonl(path, texts):
    with open(path, "w") as f:
        for t in texts:
            f.write(json.dumps({"prompt": t}) + "\n")
    return str(path)


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
    texts = [f"GOOD question {i}" for i in range(10)] + ["a long one [[long]]", "bad [[fault:400]]",
                                                          "no key [[fault:401]]", "flaky [[fault:429x1]]"]
    # prompts as a PROMPTS record set, as the data stage writes them
    from rlaif_jax.data.ids import prompt_id

    prompts_dir = tmp_path / "prompts"
    write_records(prompts_dir, PROMPTS, [
        {"prompt_id": prompt_id(t), "prompt": t, "source": "test", "index": i, "split": "feedback"}
        for i, t in enumerate(texts)])
    teacher = make_client(teacher_srv, tmp_path, model="teacher", cache="api/teacher.jsonl")
    m = teacher_stage(prompts=str(prompts_dir), out_dir=str(tmp_path / "teacher"), client=teacher,
                      temperature=0.7, max_tokens=64)
    demos = list(read_records(tmp_path / "teacher", DEMONSTRATIONS))
    assert m["num_records"] == len(demos) == 11  # 14 - length - 400 - 401
    assert all(d["finish_reason"] == "stop" and d["completion"].startswith("Answer to: ") for d in demos)
    report = json.load(open(tmp_path / "teacher" / "report.json"))
    assert report["dropped"] == {"finish_reason=length": 1} and report["request_errors"] == 2
    errors = [json.loads(l) for l in open(tmp_path / "teacher" / "errors.jsonl")]
    assert sorted(e["kind"] for e in errors) == ["http_400", "http_401"]
    prov = read_manifest(tmp_path / "teacher")["provenance"]
    assert prov["client"]["api_key_env"] == KEY_ENV and prov["report"]["api"]["retries"] == 1

    # "policy samples": the same prompts with weaker answers (no GOOD), as a JSONL file
    policy = tmp_path / "policy.jsonl"
    with open(policy, "w") as f:
        for d in demos:
            f.write(json.dumps({**d, "completion": "a weak policy sample that rambles on and on",
                                "source_model": "policy"}) + "\n")
    # the teacher's answers contain GOOD (copied from the prompt): the rule judge prefers them
    judge = make_client(judge_srv, tmp_path, model="judge", cache="api/judge.jsonl")
    critic_stage(responses_1=str(policy), responses_2=str(tmp_path / "teacher"), out_dir=str(tmp_path / "critic"),
                 client=judge, seed=0)
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


def _stage_cmd(prompts, out_dir, cache, url):
    return [sys.executable, os.path.join(REPO, "scripts", "feedback_teacher.py"),
            f"--gin_file={os.path.join(REPO, 'configs/feedback/teacher_gpt4.gin')}",
            f"--gin_param=teacher_stage.prompts='{prompts}'", f"--gin_param=teacher_stage.out_dir='{out_dir}'",
            "--gin_param=teacher_stage.split=None", "--gin_param=TEACHER='teacher'",
            f"--gin_param=FeedbackClient.base_url='{url}'", f"--gin_param=FeedbackClient.cache_path='{cache}'",
            f"--gin_param=FeedbackClient.api_key_env='{KEY_ENV}'", "--gin_param=FeedbackClient.max_concurrency=2",
            "--gin_param=FeedbackClient.requests_per_minute=None", "--gin_param=FeedbackClient.tokens_per_minute=None",
            "--gin_param=FeedbackClient.prices={'teacher': (2.0, 4.0)}"]


def test_kill_9_mid_run_resumes_to_the_same_records(serve, tmp_path, api_key):
    texts = [f"question {i}" + (" [[long]]" if i % 7 == 0 else "") for i in range(80)]
    prompts = _write_prompts_jsonl(tmp_path / "prompts.jsonl", texts)
    faults = FaultInjector()
    srv = serve(EchoTeacher(["teacher"], latency_s=0.04), faults)
    cache = tmp_path / "api" / "teacher.jsonl"
    env = {**os.environ, KEY_ENV: SECRET, "JAX_PLATFORMS": "cpu"}
    cmd = _stage_cmd(prompts, tmp_path / "out", cache, srv.url)
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
    ref = subprocess.run(_stage_cmd(prompts, tmp_path / "ref", tmp_path / "api" / "ref.jsonl", ref_srv.url),
                         env=env, capture_output=True, timeout=120)
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
