"""The preference-pair builder and its report, on hand-made comparisons with known answers."""

import pytest

from rlaif_jax.feedback.preferences import build_preference_pairs, critic_report


def _c(pid, verdict, judge="gpt4", r1="sample", r2="teacher", swapped=0, presented=None, **kw):
    presented = presented or (verdict if not swapped else {"first": "second", "second": "first"}.get(verdict, verdict))
    return {
        "prompt_id": pid,
        "prompt": f"q {pid}",
        "response_1": r1 + pid,
        "response_2": r2 + pid,
        "model_1": "policy",
        "model_2": "teacher",
        "judge": judge,
        "verdict": verdict,
        "raw_judge_text": "",
        "swapped": swapped,
        "p_1": kw.pop("p_1", None),
        "views": [
            {"swapped": swapped, "presented": presented, "verdict": verdict, "raw": "", "p_1": None, "error": None}
        ],
        "error": kw.pop("error", None),
        **kw,
    }


def test_drops_ties_invalid_identical_and_never_emits_chosen_equal_rejected():
    comps = [
        _c("a", "first"),
        _c("b", "second", swapped=1),
        _c("c", "tie"),
        _c("d", "invalid"),
        _c("e", "invalid", error="http_400: bad"),
        {**_c("f", "first"), "response_2": "sample" + "f"},  # identical texts, judged anyway
    ]
    pairs, rep = build_preference_pairs(comps)
    assert [(p["prompt_id"], p["chosen"], p["rejected"]) for p in pairs] == [
        ("a", "samplea", "teachera"),
        ("b", "teacherb", "sampleb"),
    ]
    assert rep["dropped"] == {"api_error": 1, "identical_responses": 1, "invalid": 1, "tie": 1}
    assert "chosen=policy" in pairs[0]["provenance"] and "chosen=teacher" in pairs[1]["provenance"]
    j = rep["judges"]["gpt4"]
    assert j["verdicts"] == {"first": 2, "second": 1, "tie": 1, "invalid": 2}
    assert j["api_errors"] == 1 and j["unparsed_answers"] == 1


def test_position_bias_rate_counts_the_presented_first_winner():
    # 4 decided presentations; the presented-first output won 3 times
    comps = [
        _c("a", "first", swapped=0),
        _c("b", "second", swapped=1),
        _c("c", "first", swapped=0),
        _c("d", "first", swapped=1),
    ]
    rep = critic_report(comps)["judges"]["gpt4"]
    assert rep["position_bias_rate"] == pytest.approx(0.75) and rep["swapped_rate"] == pytest.approx(0.5)
    assert rep["win_rate_by_model"] == {"policy": 0.75, "teacher": 0.25}


def test_agreement_between_critics_and_consensus_pairs():
    g = [_c(p, v, judge="gpt4") for p, v in zip("abcde", ["first", "second", "second", "first", "tie"])]
    c = [_c(p, v, judge="claude") for p, v in zip("abcde", ["first", "first", "second", "second", "first"])]
    with pytest.raises(ValueError, match="several judges"):
        build_preference_pairs(g + c)
    pairs, rep = build_preference_pairs(g + c, judge="claude")
    assert len(pairs) == 5 and all("judge=claude" in p["provenance"] for p in pairs)
    agree = rep["critic_agreement"]["claude vs gpt4"]
    assert agree == {"pairs_both_decided": 4, "agreement": 0.5}
    pairs, rep = build_preference_pairs(g + c, require_agreement=True)
    assert sorted(p["prompt_id"] for p in pairs) == ["a", "c"]
    assert rep["dropped"] == {"critics_disagree": 3}
    with pytest.raises(ValueError, match="not among"):
        build_preference_pairs(g, judge="nobody")


def test_min_confidence_uses_logprob_weighted_preferences():
    comps = [_c("a", "first", p_1=0.95), _c("b", "first", p_1=0.55), _c("c", "second", p_1=0.1), _c("d", "first")]
    pairs, rep = build_preference_pairs(comps, min_confidence=0.5)
    assert [p["prompt_id"] for p in pairs] == ["a", "c", "d"] and rep["dropped"] == {"low_confidence": 1}
