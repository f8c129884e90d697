"""A full evaluation: a tiny checkpoint generates, a rule-based judge on a local
OpenAI-compatible server judges against reference outputs, metrics are checked against the
verdicts recomputed by hand from the saved generations."""

import importlib.util
import json
import os
import subprocess
import sys

import gin
import numpy as np
import pytest

from rlaif_jax.eval.evaluate import EvalInputError, load_eval_set
from rlaif_jax.eval.settings import EvalJudgeSettings, EvalSamplingSettings
from rlaif_jax.feedback import judge as J
from rlaif_jax.feedback.server.app import ServerThread, make_app
from rlaif_jax.feedback.server.testing import FaultInjector, RuleJudge

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _script(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "scripts", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt") / "tiny"
    r = subprocess.run(
        [sys.executable, "tools/make_tiny_checkpoint.py", str(out)],
        cwd=ROOT,
        env=dict(os.environ, XLA_FLAGS=""),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    return str(out)


EVAL_SET = [
    {"instruction": "Name a color.", "output": "GOOD answer: blue is a color, and so is red.", "generator": "ref"},
    {"instruction": "Say hi.", "output": "x", "generator": "ref"},
    {"instruction": "Count to three.", "output": "GOOD: one two three", "generator": "ref"},
    {"instruction": "What is 2+2?", "output": "4", "generator": "ref"},
    {"instruction": "Write a word.", "output": "[[garbage]]", "generator": "ref"},
    {"instruction": "Pick a number.", "output": "7", "generator": "ref", "input": "between 1 and 9"},
]


def _rule_verdict(policy, reference):
    """RuleJudge's preference in canonical order (policy = first)."""
    if "[[garbage]]" in policy + reference:
        return "invalid"
    score = lambda t: (1000.0 if "GOOD" in t else 0.0) + len(t)
    # RuleJudge picks the presented (a) on equal scores; lengths differ here by construction.
    assert score(policy) != score(reference)
    return "first" if score(policy) > score(reference) else "second"


def test_full_evaluate_against_local_judge(tmp_path, tiny_ckpt, clean_gin):
    eval_path = tmp_path / "alpaca_eval.json"
    eval_path.write_text(json.dumps(EVAL_SET))
    rows = load_eval_set(str(eval_path))
    seed = next(s for s in range(100) if len({J.is_swapped(r["prompt_id"], s) for r in rows}) == 2)
    faults = FaultInjector()  # no faults: only counts what the server is sent
    with ServerThread(make_app(RuleJudge(models=["judge"]), middlewares=[faults.middleware])) as srv:
        argv = [
            "--checkpoint",
            tiny_ckpt,
            "--eval_set",
            str(eval_path),
            "--out_dir",
            str(tmp_path / "run"),
            "--gin_file",
            os.path.join(ROOT, "configs/eval/local_judge.gin"),
            f"--gin_param=FeedbackClient.base_url='{srv.url}'",
            f"--gin_param=FeedbackClient.cache_path='{tmp_path / 'cache.jsonl'}'",
            "--gin_param=FeedbackClient.progress=False",
            "--gin_param=FeedbackClient.prices={'judge': (1e6, 0.0)}",  # $1 per prompt token
            f"--gin_param=EvalJudgeSettings.seed={seed}",
            "--gin_param=EvalSamplingSettings.max_length=64",
            "--gin_param=EvalSamplingSettings.max_prompt_length=40",
            "--gin_param=EvalSamplingSettings.batch_size=8",
            "--gin_param=evaluate.lc_bootstrap=10",
            "--label",
            "base_model=tiny",
            "--label",
            "arm=sft",
            "--label",
            "sft_fraction=0.1",
        ]
        assert _script("evaluate").main(argv) == 0
        sent = len(faults.log)
        run = tmp_path / "run"
        gens = json.loads((run / "generations.json").read_text())
        judg = [json.loads(line) for line in (run / "judgments.jsonl").read_text().splitlines()]
        m = json.loads((run / "metrics.json").read_text())
        assert sent == len(EVAL_SET)  # one judge call per instruction
        assert [g["instruction"] for g in gens] == [r["prompt"] for r in rows]
        assert rows[5]["prompt"] == "Pick a number.\n\nbetween 1 and 9"

        expected = [_rule_verdict(g["output"], r["reference"]) for g, r in zip(gens, rows)]
        assert [j["verdict"] for j in judg] == expected
        # The un-swap: the raw label names a position; mapped back through `swapped` it must
        # give the content-based verdict, and both presentation orders occurred.
        assert {j["swapped"] for j in judg} == {0, 1}
        for j, e, r in zip(judg, expected, rows):
            assert j["swapped"] == int(J.is_swapped(r["prompt_id"], seed))
            if e != "invalid":
                presented = "first" if "(a)" in j["raw_judge_text"] else "second"
                assert J.unswap(presented, bool(j["swapped"])) == e
            else:
                assert j["raw_judge_text"]  # the unparseable answer is kept
        wins, losses = expected.count("first"), expected.count("second")
        n = wins + losses
        p = np.array([1.0] * wins + [0.0] * losses)
        assert m["n_wins"] == wins and m["n_losses"] == losses and m["n_invalid"] == 1 and m["n_ties"] == 0
        assert m["n_total"] == len(EVAL_SET)
        assert m["win_rate"] == pytest.approx(100 * wins / n)
        if 0 < wins < n:
            assert m["standard_error"] == pytest.approx(100 * np.std(p, ddof=1) / np.sqrt(n))
        assert m["labels"] == {"base_model": "tiny", "arm": "sft", "sft_fraction": 0.1}
        assert m["api"]["requests"] == len(EVAL_SET) and m["api"]["prompt_tokens"] > 0
        assert m["cost_usd"] == pytest.approx(m["api"]["prompt_tokens"]) == m["cost_usd_total"]
        assert "lc_win_rate" in m and m["judge"] == "judge"
        assert (run / "operative_config.gin").exists()

        # A rerun pays for nothing and regenerates nothing.
        samples_before = (run / "generations" / "samples.jsonl").read_text()
        gin.clear_config()
        assert _script("evaluate").main(argv) == 0
        assert len(faults.log) == sent
        assert (run / "generations" / "samples.jsonl").read_text() == samples_before
        m2 = json.loads((run / "metrics.json").read_text())
        # The judgments already in the run's directory are reused (not even a cache lookup).
        assert m2["win_rate"] == m["win_rate"] and m2["kept_from_out_dir"] == len(EVAL_SET)
        assert m2["api"]["requests"] == 0
        # Nothing new paid; what the first invocation paid stays on the run's books.
        assert m2["cost_usd"] == 0.0 and m2["cost_usd_total"] == pytest.approx(m["cost_usd"])

    # A report over this run and a second (hand-made) one.
    other = tmp_path / "run2"
    other.mkdir()
    (other / "metrics.json").write_text(
        json.dumps(
            {
                "win_rate": 61.0,
                "standard_error": 1.7,
                "lc_win_rate": 58.0,
                "labels": {"base_model": "tiny", "arm": "sft+dpo", "sft_fraction": 1.0},
            }
        )
    )
    rep = _script("report")
    assert rep.main([str(run), str(other), "--out_dir", str(tmp_path / "report")]) == 0
    md = (tmp_path / "report" / "results.md").read_text()
    assert "61.00 ± 1.70" in md and "sft+dpo" in md
    for png in ("win_rate_bars.png", "win_rate_vs_sft_fraction.png", "lc_win_rate_bars.png"):
        assert (tmp_path / "report" / png).stat().st_size > 5000


def test_bad_eval_inputs(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('[{"instruction": "a", "output": "b"}, {"instruction": 3}]')
    with pytest.raises(EvalInputError, match=r"bad.json: record 1"):
        load_eval_set(str(bad))
    noref = tmp_path / "noref.jsonl"
    noref.write_text('{"prompt": "first"}\n{"prompt": "second"}\n')
    with pytest.raises(EvalInputError, match=r"noref.jsonl: record 0 .*no reference output"):
        load_eval_set(str(noref))
    refs = tmp_path / "refs.json"
    refs.write_text(json.dumps([{"instruction": "first", "output": "R1", "generator": "davinci"}]))
    with pytest.raises(EvalInputError, match=r"record 1 \('second'\).*refs.json has no output"):
        load_eval_set(str(noref), references=str(refs))
    refs.write_text(
        json.dumps(
            [
                {"instruction": "first", "output": "R1", "generator": "davinci"},
                {"instruction": "second", "output": "R2"},
            ]
        )
    )
    rows = load_eval_set(str(noref), references=str(refs))
    assert [(r["prompt"], r["reference"], r["reference_generator"]) for r in rows] == [
        ("first", "R1", "davinci"),
        ("second", "R2", "reference"),
    ]
    broken = tmp_path / "broken.json"
    broken.write_text('[{"instruction": "a", "output": "b"},')
    with pytest.raises(EvalInputError, match="broken.json"):
        load_eval_set(str(broken))


def test_logprob_weighted_judge_on_existing_outputs(tmp_path):
    """policy_outputs path (no generation), both orders, continuous preferences from the
    judge's top_logprobs (RuleJudge puts 0.9 on the label it picks)."""
    from rlaif_jax.eval.evaluate import evaluate
    from rlaif_jax.feedback.client import FeedbackClient

    eval_path = tmp_path / "eval.json"
    eval_path.write_text(
        json.dumps(
            [
                {"instruction": "q1", "output": "short", "generator": "ref"},
                {"instruction": "q2", "output": "GOOD reference", "generator": "ref"},
                {"instruction": "q3", "output": "a much longer reference answer", "generator": "ref"},
                {"instruction": "q4", "output": "same", "generator": "ref"},
            ]
        )
    )
    outs = tmp_path / "outs.json"
    outs.write_text(
        json.dumps(
            [
                {"instruction": "q1", "output": "a longer policy answer"},  # win
                {"instruction": "q2", "output": "policy"},  # loss
                {"instruction": "q3", "output": "GOOD policy"},  # win
                {"instruction": "q4", "output": "same"},  # identical: a tie, never sent
            ]
        )
    )
    with ServerThread(make_app(RuleJudge(models=["judge"], confidence=0.9))) as srv:

        def run(cache, **judge):
            client = FeedbackClient(
                model="judge",
                cache_path=str(tmp_path / cache),
                base_url=srv.url,
                api_key_env="NO_SUCH_KEY_VAR",
                progress=False,
            )
            return evaluate(
                out_dir=str(tmp_path / "run"),
                eval_set=str(eval_path),
                policy_outputs=str(outs),
                client=client,
                judge=EvalJudgeSettings(both_orders=True, logprobs=True, **judge),
                lc_bootstrap=0,
            )

        m = run("c.jsonl")
        # A rerun into the same out_dir with another (empty) cache pays for nothing: the
        # judgments written there were asked the same way (issue 39, case 6).
        again = run("other_cache.jsonl")
        reseeded = run("third_cache.jsonl", seed=1)  # asked another way: asked again
    assert (m["n_wins"], m["n_losses"], m["n_ties"], m["n_invalid"], m["n_identical"]) == (2, 1, 1, 0, 1)
    assert m["win_rate"] == pytest.approx(100 * 2.5 / 4)
    assert m["continuous_win_rate"] == pytest.approx(100 * (0.9 + 0.1 + 0.9 + 0.5) / 4)
    assert m["api"]["requests"] == 6  # 3 pairs x 2 orders
    assert again["api"]["requests"] == 0 and again["kept_from_out_dir"] == 4  # q4, identical, is never sent
    assert again["win_rate"] == m["win_rate"] and again["continuous_win_rate"] == m["continuous_win_rate"]
    assert reseeded["api"]["requests"] == 6 and reseeded["kept_from_out_dir"] == 0


def test_reward_protocol_metrics():
    from rlaif_jax.eval.reward_score import reward_protocol_metrics

    m = reward_protocol_metrics([1.0, 0.0, 2.0, -1.0], [0.0, 0.0, 3.0, -2.0])
    assert m["mean_reward"] == pytest.approx(0.5)
    assert m["mean_reward_margin"] == pytest.approx(0.25)
    assert (m["n_wins"], m["n_losses"], m["n_ties"]) == (2, 1, 1)
    assert m["win_rate"] == pytest.approx(62.5)
    p = np.array([1, 0.5, 0, 1])
    assert m["standard_error"] == pytest.approx(100 * np.std(p, ddof=1) / 2)
    sig = 1 / (1 + np.exp(-np.array([1.0, 0.0, -1.0, 1.0])))
    assert m["bt_win_rate"] == pytest.approx(100 * sig.mean())
    with pytest.raises(ValueError, match="one length"):
        reward_protocol_metrics([1.0], [1.0, 2.0])


def test_reward_model_protocol(tmp_path, tiny_ckpt):
    """The reward-model protocol end to end on a tiny reward model: batched, padded scores
    equal one-sequence-at-a-time forward passes, and metrics follow from them."""
    import jax

    from rlaif_jax.data.tokenize import Encoder, load_tokenizer
    from rlaif_jax.eval.evaluate import evaluate
    from rlaif_jax.eval.reward_score import RewardScorer, reward_protocol_metrics
    from rlaif_jax.models import build_model
    from rlaif_jax.models.decoder import init_scalar_head
    from rlaif_jax.models.hf_io import load_hf, save_hf
    from rlaif_jax.train.reward import sequence_rewards

    cfg, params = load_hf(tiny_ckpt)
    params = dict(params)
    params.pop("lm_head", None)
    params["score_head"] = {"kernel": init_scalar_head(cfg, jax.random.key(0))["kernel"] * 50.0}
    rm_dir = str(tmp_path / "rm")
    tok = load_tokenizer(tiny_ckpt)
    save_hf(rm_dir, cfg, params, tokenizer=tok, score_head=True)

    prompts = ["Name a color.", "Say hi.", "Count to three."]
    policy = ["blue", "hello there, friend", "one two three"]
    refs = ["red", "hi", "1 2 3"]
    scorer = RewardScorer(rm_dir, max_length=64, max_prompt_length=32, batch_size=2)
    got = scorer.score(prompts, policy)

    rm_cfg, rm_params = load_hf(rm_dir, lm_head=False, score_head=True)
    model = build_model(rm_cfg, lm_head=False, scalar_heads=("score",))
    enc = Encoder(tok, "paper", 64, 32).encode_sft(prompts, policy)
    want = []
    for e in enc:
        ids = np.concatenate([e.prompt, e.response])[None].astype(np.int32)
        pos = np.arange(ids.shape[1], dtype=np.int32)[None]
        want.append(float(sequence_rewards(model, rm_params, ids, pos, np.ones_like(ids))[0]))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    assert np.std(want) > 1e-3  # the scores differ, so the comparison means something

    eval_path = tmp_path / "eval.json"
    eval_path.write_text(json.dumps([{"instruction": p, "output": r} for p, r in zip(prompts, refs)]))
    outs = tmp_path / "outs.json"
    outs.write_text(json.dumps([{"instruction": p, "output": o} for p, o in zip(prompts, policy)]))
    m = evaluate(
        out_dir=str(tmp_path / "run"),
        eval_set=str(eval_path),
        policy_outputs=str(outs),
        protocol="reward_model",
        reward_model=rm_dir,
        sampling=EvalSamplingSettings(max_length=64, max_prompt_length=32),
        reward_batch_size=2,
    )
    expect = reward_protocol_metrics(want, scorer.score(prompts, refs))
    assert m["win_rate"] == pytest.approx(expect["win_rate"])
    assert m["mean_reward"] == pytest.approx(expect["mean_reward"], abs=1e-4)
    assert m["cost_usd"] == 0.0


def test_eval_protocol_configs(clean_gin):
    """The protocol files parse against the real configurables, bind the paper's sampling,
    and never a key."""
    from rlaif_jax.cli import import_configurables

    import_configurables()
    gin.add_config_file_search_path(ROOT)
    seen = {}
    for name in (
        "alpaca_eval_gpt4",
        "alpaca_eval_claude",
        "alpaca_eval_gpt4o_weighted",
        "alpaca_eval_gpt4_batch",
        "local_judge",
        "reward_model",
    ):
        gin.clear_config()
        gin.parse_config_file(os.path.join(ROOT, "configs", "eval", f"{name}.gin"))
        text = gin.config_str()
        assert "sk-" not in text and "api_key =" not in text.replace("api_key_env", "")
        assert gin.query_parameter("EvalSamplingSettings.temperature") == 0.7
        assert gin.query_parameter("EvalSamplingSettings.top_p") == 0.9
        seen[name] = text
    gin.clear_config()
    gin.parse_config_file(os.path.join(ROOT, "configs", "eval", "alpaca_eval_claude.gin"))
    assert gin.query_parameter("%JUDGE") == "claude-v1"
    gin.clear_config()
    gin.parse_config_file(os.path.join(ROOT, "configs", "eval", "alpaca_eval_gpt4o_weighted.gin"))
    assert gin.query_parameter("EvalJudgeSettings.logprobs") is True


def test_stale_generations_refused(tmp_path):
    from rlaif_jax.eval.evaluate import _check_fingerprint

    d = str(tmp_path / "gen")
    _check_fingerprint(d, {"temperature": 0.7, "prompt_ids": ["a"]})
    _check_fingerprint(d, {"temperature": 0.7, "prompt_ids": ["a"]})  # same: resumes
    with pytest.raises(ValueError, match=r"different \['temperature'\]"):
        _check_fingerprint(d, {"temperature": 1.0, "prompt_ids": ["a"]})


class _NoRequests:
    """A judge client that fails the test if the evaluation touches it."""

    def __getattr__(self, name):
        raise AssertionError(f"the judge client was used ({name}) before the inputs were checked")


def test_alpaca_eval_lc_inputs_checked_before_any_request(tmp_path):
    from rlaif_jax.errors import ConfigError
    from rlaif_jax.eval.evaluate import evaluate

    rows = [{"instruction": f"q{i}", "output": "ref " * i, "generator": "ref"} for i in range(1, 5)]
    (tmp_path / "eval.json").write_text(json.dumps(rows))
    (tmp_path / "outs.json").write_text(json.dumps([{"instruction": r["instruction"], "output": "x"} for r in rows]))
    short = tmp_path / "instruction_difficulty.csv"
    short.write_text("index,instruction_difficulty\n0,0.1\n1,-0.2\n")
    cases = [
        ({}, r"evaluate.lc_glm = 'length_controlled_v1'.*Bind evaluate.lc_df_gamed"),
        ({"lc_df_gamed": str(tmp_path / "absent.csv")}, r"absent.csv: cannot read"),
        (
            {"lc_glm": "length_controlled_noreg", "lc_difficulty_file": str(short)},
            r"instruction_difficulty.csv: no difficulty for instruction\(s\) \[2, 3\] of 4",
        ),
        ({"lc_glm": "length_controlled_minimal", "lc_solver": "lbfgs"}, r"evaluate.lc_solver = 'lbfgs'"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ConfigError, match=message):
            evaluate(
                out_dir=str(tmp_path / "run"),
                eval_set=str(tmp_path / "eval.json"),
                policy_outputs=str(tmp_path / "outs.json"),
                client=_NoRequests(),
                judge=EvalJudgeSettings(),
                lc_method="alpaca_eval",
                **kwargs,
            )
        assert not (tmp_path / "run" / "judgments.jsonl").exists()
