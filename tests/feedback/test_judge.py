"""Judge templates, verdict parsing, order randomization and un-swapping, both-orders mode,
logprob-weighted preferences and ratings, end to end against a rule-based critic server."""

import math

import pytest

from rlaif_jax.feedback import judge as J
from rlaif_jax.feedback.preferences import build_preference_pairs
from rlaif_jax.feedback.server.testing import FaultInjector, RuleJudge
from rlaif_jax.feedback.settings import JudgeSettings
from rlaif_jax.feedback.stages import judge_pairs

from .conftest import make_client


@pytest.mark.parametrize(
    "text,verdict",
    [
        ("Output (a)", "first"),
        ("Output (b)", "second"),
        (" output (B). ", "second"),
        ("(a)", "first"),
        ("b", "second"),
        ("**Output (a)**", "first"),
        ("Output (a) is better.", "first"),
        ("I prefer Output (b) because it is correct.", "second"),
        ("Tie", "tie"),
        ("Output (a) is better than Output (b)", "first"),  # the answer leads with its label
        ("Both Output (a) and Output (b) have merit", "invalid"),
        ("", "invalid"),
        (None, "invalid"),
        ("I cannot decide", "invalid"),
        ("Output (c)", "invalid"),
        ("Output and more", "invalid"),
    ],
)
def test_parse_pairwise(text, verdict):
    assert J.parse_pairwise(text) == verdict


@pytest.mark.parametrize(
    "text,rating",
    [("Rating: 4", 4), ("rating:5", 5), ("3", 3), ("Rating: 9", None), ("good", None), ("**Rating: 2**", 2)],
)
def test_parse_rating(text, rating):
    assert J.parse_rating(text) == rating


def test_label_probability_and_expected_rating():
    lp = {
        "content": [
            {"token": "Output", "logprob": 0.0, "top_logprobs": []},
            {"token": " (", "logprob": 0.0, "top_logprobs": []},
            {
                "token": "b",
                "logprob": math.log(0.6),
                "top_logprobs": [
                    {"token": "b", "logprob": math.log(0.6)},
                    {"token": "a", "logprob": math.log(0.3)},
                    {"token": "A", "logprob": math.log(0.1)},
                ],
            },
        ]
    }
    assert J.label_probability(lp) == pytest.approx(0.4)
    assert J.label_probability(None) is None
    assert J.label_probability({"content": [{"token": "x", "logprob": 0.0}]}) is None
    r = {
        "content": [
            {
                "token": " 4",
                "logprob": math.log(0.5),
                "top_logprobs": [{"token": "4", "logprob": math.log(0.5)}, {"token": "5", "logprob": math.log(0.5)}],
            }
        ]
    }
    assert J.expected_rating(r) == pytest.approx(4.5)


def test_templates_are_versioned_hashed_and_render_in_one_pass(tmp_path):
    t = J.load_template("pairwise_v1")
    assert t.name == "pairwise" and t.version == 1 and t.id.startswith("pairwise_v1@")
    assert t.placeholders() == {"instruction", "output_a", "output_b"}
    msgs = t.render(instruction="say {output_b}", output_a="AAA", output_b="BBB")
    assert msgs[0]["role"] == "system" and "say {output_b}" in msgs[1]["content"]
    assert msgs[1]["content"].index("AAA") < msgs[1]["content"].index("BBB")
    edited = tmp_path / "pairwise_v1.txt"
    edited.write_text(open(t.path).read().replace("impartial", "fair"))
    t2 = J.load_template(str(edited))
    assert t2.id != t.id and t2.name == t.name  # an edit re-keys every request
    with pytest.raises(KeyError, match="output_b"):
        t.render(instruction="x", output_a="y")
    with pytest.raises(FileNotFoundError, match="built-in"):
        J.load_template("nope_v9")


def test_order_randomization_is_seeded_by_prompt_and_balanced():
    ids = [f"{i:016x}" for i in range(2000)]
    s = [J.is_swapped(p, seed=0) for p in ids]
    assert 0.45 < sum(s) / len(s) < 0.55
    assert s == [J.is_swapped(p, seed=0) for p in ids]
    assert s != [J.is_swapped(p, seed=1) for p in ids]
    assert J.unswap("first", True) == "second" and J.unswap("invalid", True) == "invalid"


def _tasks(n, garbage_every=0):
    tasks = []
    for i in range(n):
        good, bad = f"GOOD answer {i}", f"weak answer {i} with extra words to be longer"
        if garbage_every and i % garbage_every == 0:
            bad += " [[garbage]]"
        # canonical order alternates, so the right winner is response_1 half of the time
        r1, r2 = (good, bad) if i % 2 == 0 else (bad, good)
        tasks.append(
            J.PairTask(
                f"pid{i:04d}",
                f"question {i}",
                r1,
                r2,
                "policy" if i % 2 else "teacher",
                "teacher" if i % 2 else "policy",
            )
        )
    return tasks


def test_unswap_maps_verdicts_back_to_the_canonical_order(serve, tmp_path, api_key):
    srv = serve(RuleJudge(["judge"]))
    client = make_client(srv, tmp_path, model="judge")
    tasks = _tasks(40)
    comps = judge_pairs(client, tasks, JudgeSettings(seed=0))
    assert {c["swapped"] for c in comps} == {0, 1}  # both orders really were shown
    for c in comps:
        assert c["verdict"] == ("first" if "GOOD" in c["response_1"] else "second"), c
    pairs, report = build_preference_pairs(comps)
    assert len(pairs) == 40
    assert all("GOOD" in p["chosen"] and "GOOD" not in p["rejected"] for p in pairs)
    # fails if chosen were always the first (or always the presented-first) response
    by_pid = {t.prompt_id: t for t in tasks}
    assert any(p["chosen"] == by_pid[p["prompt_id"]].response_2 for p in pairs)
    assert any(p["chosen"] == by_pid[p["prompt_id"]].response_1 for p in pairs)
    j = report["judges"]["judge"]
    assert 0.3 < j["position_bias_rate"] < 0.7 and 0.3 < j["swapped_rate"] < 0.7
    assert j["win_rate_by_model"] == {"teacher": 1.0}  # GOOD is always the teacher's


def test_invalid_answers_keep_raw_text_and_never_become_preferences(serve, tmp_path, api_key):
    srv = serve(RuleJudge(["judge"]))
    client = make_client(srv, tmp_path, model="judge")
    comps = judge_pairs(client, _tasks(12, garbage_every=3), JudgeSettings())
    bad = [c for c in comps if "[[garbage]]" in c["response_1"] + c["response_2"]]
    assert len(bad) == 4
    assert all(
        c["verdict"] == "invalid" and c["raw_judge_text"] == "I cannot decide; both have merit." and c["error"] is None
        for c in bad
    )
    pairs, report = build_preference_pairs(comps)
    assert len(pairs) == 8 and report["dropped"] == {"invalid": 4}
    assert report["judges"]["judge"]["unparsed_answers"] == 4


def test_identical_outputs_tie_without_a_request(serve, tmp_path, api_key):
    faults = FaultInjector()
    srv = serve(RuleJudge(["judge"]), faults)
    client = make_client(srv, tmp_path, model="judge")
    t = J.PairTask("p", "q", "same text", "same text")
    (c,) = judge_pairs(client, [t], JudgeSettings())
    assert c["verdict"] == "tie" and not faults.log
    pairs, report = build_preference_pairs([c])
    assert pairs == [] and report["dropped"] == {"tie": 1}


def test_both_orders_measures_position_bias(serve, tmp_path, api_key):
    srv = serve(RuleJudge(["judge"], position_bias=0.5, seed=1))
    client = make_client(srv, tmp_path, model="judge")
    comps = judge_pairs(client, _tasks(60), JudgeSettings(both_orders=True))
    assert all(len(c["views"]) == 2 and {v["swapped"] for v in c["views"]} == {0, 1} for c in comps)
    agree = [c for c in comps if c["orders_agree"]]
    disagree = [c for c in comps if c["orders_agree"] is False]
    assert agree and disagree
    assert all(c["verdict"] == "tie" for c in disagree)
    assert all(c["verdict"] == ("first" if "GOOD" in c["response_1"] else "second") for c in agree)
    _, report = build_preference_pairs(comps)
    j = report["judges"]["judge"]
    assert j["both_orders_agreement"] == pytest.approx(len(agree) / 60)
    assert j["position_bias_rate"] > 0.6  # says "Output (a)" half the time regardless
    strict = judge_pairs(client, _tasks(60), JudgeSettings(both_orders=True, on_disagreement="invalid"))
    assert sum(c["verdict"] == "invalid" for c in strict) == len(disagree)  # all cached: same answers


def test_logprob_weighted_preference_is_unswapped(serve, tmp_path, api_key):
    srv = serve(RuleJudge(["judge"], confidence=0.8))
    client = make_client(srv, tmp_path, model="judge")
    comps = judge_pairs(client, _tasks(20), JudgeSettings(logprobs=True, top_logprobs=2))
    for c in comps:
        want = 0.8 if "GOOD" in c["response_1"] else 0.2
        assert c["p_1"] == pytest.approx(want), c
    pairs, report = build_preference_pairs(comps, min_confidence=0.7)
    assert pairs == [] and report["dropped"] == {"low_confidence": 20}


def test_rating_mode(serve, tmp_path, api_key):
    srv = serve(RuleJudge(["judge"], confidence=0.6))
    client = make_client(srv, tmp_path, model="judge")
    tasks = _tasks(6, garbage_every=4) + [J.PairTask("eq", "q", "GOOD one", "GOOD two")]
    comps = judge_pairs(client, tasks, JudgeSettings(template="rating_v1", mode="rating", logprobs=True))
    for c, t in zip(comps, tasks):
        if "[[garbage]]" in t.response_1 + t.response_2:
            assert c["verdict"] == "invalid" and None in c["ratings"]
        elif t.prompt_id == "eq":
            assert c["verdict"] == "tie" and c["ratings"] == [5, 5]
        else:
            assert c["verdict"] == ("first" if "GOOD" in t.response_1 else "second")
            assert sorted(c["ratings"]) == [2, 5]
            assert (c["p_1"] > 0.5) == ("GOOD" in t.response_1)
    pairs, report = build_preference_pairs(comps)
    assert all(p["chosen"] != p["rejected"] and "GOOD" in p["chosen"] for p in pairs)
    assert report["dropped"] == {"invalid": 2, "tie": 1}
