import json

import pytest

from rlaif_jax.data import prompt_id
from rlaif_jax.data.prompts import (
    InputError,
    comparisons_to_preferences,
    dedup,
    length_filter,
    parse_sharegpt,
    prepare_prompts,
    read_paper_annotations,
    read_paper_completions,
    read_prompt_source,
    split_by_order,
)
from rlaif_jax.data.prompts.types import PromptExample, Stats
from rlaif_jax.data.records import COMPARISONS, DEMONSTRATIONS, PREFERENCES, PROMPTS, read_records, write_records


def conv(*turns):
    return {"id": "x", "conversations": [{"from": f, "value": v} for f, v in turns]}


SHAREGPT = [
    conv(("human", "What is 2+2?"), ("gpt", "4"), ("human", "and 3+3?"), ("gpt", "6")),
    conv(("gpt", "Hi, how can I help?"), ("human", "hello")),
    conv(("human", "Explain </s> tokens"), ("gpt", "ok")),
    conv(("human", "fine"), ("gpt", "contains <|endoftext|> later")),
    conv(("human", "Say <s>"), ("gpt", "no")),
    conv(("system", "be nice"), ("human", "hi"), ("gpt", "hey")),
    conv(("human", "unanswered")),
    conv(("human", "   "), ("gpt", "empty")),
    {"id": "y", "conversations": []},
    conv(("human", "What is 2+2?"), ("gpt", "four")),  # duplicate prompt
    conv(("user", "Write a haiku"), ("assistant", "Leaves fall")),
]


def test_prompt_id_is_sha256_prefix():
    assert prompt_id("hello") == "2cf24dba5fb0a30e"
    assert prompt_id("hello ") != prompt_id("hello")


def test_sharegpt_filters_and_first_turn(tmp_path):
    path = tmp_path / "sg.json"
    path.write_text(json.dumps(SHAREGPT))
    prompts, prefs, stats = read_prompt_source(path)
    assert prefs == []
    assert [(p.prompt, p.completion, p.index) for p in prompts] == [
        ("What is 2+2?", "4", 0),
        ("What is 2+2?", "four", 9),
        ("Write a haiku", "Leaves fall", 10),
    ]
    assert stats.read == 11 and stats.kept == 3
    assert stats.dropped == {
        "starts_with_assistant": 1,
        "special_token": 3,
        "first_turn_not_human": 1,
        "no_assistant_reply": 1,
        "empty_prompt": 1,
        "empty_conversation": 1,
    }
    assert prompts[0].completion_model == "sharegpt-chatgpt"


def test_sharegpt_malformed_record_names_index_and_field():
    rows = [conv(("human", "a"), ("gpt", "b")), {"id": "z", "conversations": [{"from": "human"}]}]
    with pytest.raises(InputError, match=r"src: record 1.conversations\[0\]: missing field 'value'"):
        parse_sharegpt(rows, "src")
    with pytest.raises(InputError, match=r"src: record 0: missing field 'conversations'"):
        parse_sharegpt([{"id": 1}], "src")


def test_alpaca_and_alpacaeval(tmp_path):
    rows = [
        {"instruction": "Translate", "input": "bonjour", "output": "hello"},
        {"instruction": "List colors", "input": "", "output": "red"},
        {"instruction": "Eval prompt", "output": "x", "generator": "text-davinci-003", "dataset": "helpful_base"},
    ]
    path = tmp_path / "alpaca.json"
    path.write_text(json.dumps(rows))
    prompts, _, stats = read_prompt_source(path)
    assert [p.prompt for p in prompts] == ["Translate\n\nbonjour", "List colors", "Eval prompt"]
    assert prompts[2].completion_model == "text-davinci-003"
    assert stats.kept == 3


def test_jsonl_and_bad_line(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a"}\n\n{"prompt": "b"}\n')
    prompts, _, _ = read_prompt_source(path)
    assert [p.prompt for p in prompts] == ["a", "b"]
    path.write_text('{"prompt": "a"}\n{"prompt": "b"\n')
    with pytest.raises(InputError, match=r"p.jsonl: line 2 \(record 1\): invalid JSON"):
        read_prompt_source(path)
    path.write_text('{"prompt": "a"}\n{"prompt": 3}\n')
    with pytest.raises(InputError, match=r"record 1: field 'prompt' must be str"):
        read_prompt_source(path)


TRL_ROWS = {
    "prompt_completion": [{"prompt": "Q1", "completion": "A1"}],
    "conv_prompt_completion": [
        {"prompt": [{"role": "user", "content": "Q1"}], "completion": [{"role": "assistant", "content": "A1"}]}
    ],
    "messages": [{"messages": [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"}]}],
}


@pytest.mark.parametrize("kind", sorted(TRL_ROWS))
def test_trl_prompt_completion_forms(tmp_path, kind):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in TRL_ROWS[kind]))
    prompts, prefs, _ = read_prompt_source(path)
    assert [(p.prompt, p.completion) for p in prompts] == [("Q1", "A1")]
    assert prefs == []


def test_trl_preference_forms(tmp_path):
    u = lambda c: [{"role": "user", "content": c}]  # noqa: E731
    a = lambda c: [{"role": "assistant", "content": c}]  # noqa: E731
    rows = [
        {"prompt": "Q1", "chosen": "good", "rejected": "bad"},
        {"prompt": u("Q2"), "chosen": a("good2"), "rejected": a("bad2")},
        {"chosen": u("Q3") + a("good3"), "rejected": u("Q3") + a("bad3")},
        {"prompt": "Q4", "chosen": "same", "rejected": "same"},
    ]
    path = tmp_path / "prefs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    prompts, prefs, stats = read_prompt_source(path)
    assert prompts == []
    assert [(p["prompt"], p["chosen"], p["rejected"]) for p in prefs] == [
        ("Q1", "good", "bad"),
        ("Q2", "good2", "bad2"),
        ("Q3", "good3", "bad3"),
    ]
    assert prefs[2]["prompt_id"] == prompt_id("Q3")
    assert stats.dropped == {"chosen_equals_rejected": 1}
    path.write_text(json.dumps({"prompt": u("a") + u("b"), "chosen": "x", "rejected": "y"}))
    with pytest.raises(InputError, match=r"record 0.prompt: only single-turn"):
        read_prompt_source(path)


def test_hf_datasets_from_disk_and_parquet(tmp_path):
    import datasets

    ds = datasets.Dataset.from_list(
        [{"prompt": "Q1", "chosen": "c", "rejected": "r"}, {"prompt": "Q2", "chosen": "c2", "rejected": "r2"}]
    )
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "dd"))
    _, prefs, _ = read_prompt_source(str(tmp_path / "dd"))
    assert [p["prompt"] for p in prefs] == ["Q1", "Q2"]
    sg = datasets.Dataset.from_list([conv(("human", "hi there"), ("gpt", "hello"))])
    sg.to_parquet(str(tmp_path / "sg.parquet"))
    prompts, _, _ = read_prompt_source(str(tmp_path / "sg.parquet"))
    assert [(p.prompt, p.completion) for p in prompts] == [("hi there", "hello")]


# The paper's released files, in their format (AlpacaEval outputs / annotations).
PAPER_COMPLETIONS = [
    {"instruction": "Give three tips for staying healthy.", "output": "1. Eat well", "generator": "gpt-4-0314"},
    {
        "instruction": "What is the capital of France?",
        "output": "Paris.",
        "generator": "gpt-4-0314",
        "finish_reason": "stop",
    },
]
PAPER_ANNOTATIONS = [
    {
        "instruction": "Give three tips",
        "output_1": "sft says",
        "output_2": "gpt says",
        "generator_1": "sft",
        "generator_2": "gpt-3.5",
        "annotator": "alpaca_eval_gpt4",
        "preference": 2.0,
        "raw_completion": "Output (b)",
    },
    {
        "instruction": "Capital?",
        "output_1": "Paris",
        "output_2": "Lyon",
        "annotator": "alpaca_eval_gpt4",
        "preference": 1,
    },
    {"instruction": "Tie", "output_1": "same", "output_2": "same", "annotator": "alpaca_eval_gpt4", "preference": 1.5},
    {"instruction": "Unparsed", "output_1": "a", "output_2": "b", "annotator": "alpaca_eval_gpt4", "preference": None},
    {
        "instruction": "NaN",
        "output_1": "a",
        "output_2": "b",
        "annotator": "alpaca_eval_gpt4",
        "preference": float("nan"),
    },
]


def test_paper_completions_import(tmp_path):
    path = tmp_path / "gpt4.json"
    path.write_text(json.dumps(PAPER_COMPLETIONS))
    demos, stats = read_paper_completions(path)
    recs = [d.demonstration_record() for d in demos]
    assert recs[1] == {
        "prompt_id": prompt_id("What is the capital of France?"),
        "prompt": "What is the capital of France?",
        "completion": "Paris.",
        "source_model": "gpt-4-0314",
        "finish_reason": "stop",
    }
    assert recs[0]["finish_reason"] == "unknown"
    write_records(tmp_path / "demos", DEMONSTRATIONS, recs)
    assert list(read_records(tmp_path / "demos")) == recs
    path.write_text(json.dumps([{"instruction": "no output"}]))
    with pytest.raises(InputError, match="record 0: missing field 'output'"):
        read_paper_completions(path)


def test_paper_annotations_import_and_pairs(tmp_path):
    path = tmp_path / "annotations.json"
    path.write_text(json.dumps(PAPER_ANNOTATIONS).replace("NaN", "NaN"))
    comps = read_paper_annotations(path)
    assert [c["verdict"] for c in comps] == ["second", "first", "tie", "invalid", "invalid"]
    assert comps[0]["raw_judge_text"] == "Output (b)" and comps[0]["model_2"] == "gpt-3.5"
    write_records(tmp_path / "comps", COMPARISONS, comps)
    assert list(read_records(tmp_path / "comps", COMPARISONS)) == comps
    prefs, stats = comparisons_to_preferences(comps, "annotations.json")
    assert [(p["chosen"], p["rejected"]) for p in prefs] == [("gpt says", "sft says"), ("Paris", "Lyon")]
    assert stats.dropped == {"tie": 1, "invalid": 2}
    write_records(tmp_path / "prefs", PREFERENCES, prefs)
    assert [r["chosen"] for r in read_records(tmp_path / "prefs")] == ["gpt says", "Paris"]
    path.write_text(json.dumps([dict(PAPER_ANNOTATIONS[0], preference=3)]))
    with pytest.raises(InputError, match="record 0: field 'preference'=3"):
        read_paper_annotations(path)


def test_length_filter_dedup_split():
    exs = [PromptExample(t, "s", i) for i, t in enumerate(["a b", "x" * 11, "a b", "w " * 5, "c"])]
    stats = Stats()
    kept = length_filter(exs, stats, max_words=5, max_chars=11)
    assert [e.index for e in kept] == [0, 2, 4]
    assert stats.dropped == {"too_many_chars": 1, "too_many_words": 1}
    kept = dedup(kept, stats)
    assert [e.index for e in kept] == [0, 4]
    many = [PromptExample(str(i), "s", i) for i in range(25)]
    sft, fb = split_by_order(many, 0.1)
    assert [e.index for e in sft] == [0, 1] and [e.index for e in fb] == list(range(2, 25))
    sft, fb = split_by_order(many, 0.5)
    assert len(sft) == 12 and sft + fb == many


def test_prepare_prompts_end_to_end(tmp_path):
    rows = [conv(("human", f"question {i}"), ("gpt", f"answer {i}")) for i in range(30)]
    rows.insert(5, conv(("human", "question 0"), ("gpt", "dup")))
    rows.insert(7, conv(("human", "long " * 30), ("gpt", "x")))
    path = tmp_path / "sg.json"
    path.write_text(json.dumps(rows))
    stats = prepare_prompts(str(path), str(tmp_path / "out"), max_words=20, num_shards=2)
    assert stats["sft"] == 3 and stats["feedback"] == 27
    assert stats["dropped"] == {"duplicate": 1, "too_many_words": 1}
    sft = list(read_records(tmp_path / "out/prompts/sft", PROMPTS))
    fb = list(read_records(tmp_path / "out/prompts/feedback", PROMPTS))
    assert [r["prompt"] for r in sft + fb] == [f"question {i}" for i in range(30)]
    assert all(r["split"] == "sft" for r in sft) and all(r["prompt_id"] == prompt_id(r["prompt"]) for r in fb)
    demos = list(read_records(tmp_path / "out/demonstrations/feedback", DEMONSTRATIONS))
    assert [d["prompt_id"] for d in demos] == [r["prompt_id"] for r in fb]
    assert demos[0]["completion"] == "answer 3"
    assert json.loads((tmp_path / "out/stats.json").read_text())["read"] == 32


def test_finish_reasons_are_normalized():
    from rlaif_jax.data.records import normalize_finish_reason

    ex = PromptExample("p", "s", 0, "c", "claude-v1", "max_tokens")
    assert ex.demonstration_record()["finish_reason"] == "length"
    assert normalize_finish_reason("stop_sequence") == "stop" and normalize_finish_reason(None) == "unknown"
    with pytest.raises(ValueError, match="'banana'"):
        normalize_finish_reason("banana")


def test_top_level_object_is_rejected(tmp_path):
    path = tmp_path / "obj.json"
    path.write_text(json.dumps({"data": [{"prompt": "a"}]}, indent=2))
    with pytest.raises(InputError, match="top-level JSON object"):
        read_prompt_source(path)


def test_import_paper_files_into_record_sets(tmp_path):
    from rlaif_jax.data.prompts import import_paper_annotations, import_paper_completions

    rows = [conv(("human", f"q{i}"), ("gpt", f"chatgpt {i}")) for i in range(20)]
    (tmp_path / "sg.json").write_text(json.dumps(rows))
    prepare_prompts(str(tmp_path / "sg.json"), str(tmp_path / "prep"))
    gpt4 = [
        {"instruction": f"q{i}", "output": f"gpt4 {i}", "finish_reason": "length" if i == 5 else "stop"}
        for i in range(20)
    ]
    gpt4.append({"instruction": "not a sharegpt prompt", "output": "x", "finish_reason": "stop"})
    (tmp_path / "gpt4.json").write_text(json.dumps(gpt4))
    stats = import_paper_completions(
        str(tmp_path / "gpt4.json"),
        str(tmp_path / "gpt4"),
        source_model="gpt-4-0314",
        prompts_dir=str(tmp_path / "prep"),
        keep_finish_reasons=("stop",),
    )
    assert stats["sft"] == 2 and stats["feedback"] == 17
    assert stats["dropped"] == {"finish_reason_length": 1, "not_in_prompts": 1}
    sft = list(read_records(tmp_path / "gpt4/demonstrations/sft", DEMONSTRATIONS))
    assert [(d["prompt"], d["completion"], d["source_model"]) for d in sft] == [
        ("q0", "gpt4 0", "gpt-4-0314"),
        ("q1", "gpt4 1", "gpt-4-0314"),
    ]

    (tmp_path / "ann.json").write_text(json.dumps(PAPER_ANNOTATIONS))
    stats = import_paper_annotations(str(tmp_path / "ann.json"), str(tmp_path / "ann"))
    assert stats["verdicts"] == {"second": 1, "first": 1, "tie": 1, "invalid": 2}
    assert len(list(read_records(tmp_path / "ann/comparisons", COMPARISONS))) == 5
    assert [p["chosen"] for p in read_records(tmp_path / "ann/preferences", PREFERENCES)] == ["gpt says", "Paris"]


# -- bad input never passes silently, good data is never replaced by less --------------------


def _prepared(tmp_path, n=20):
    src = tmp_path / "good.jsonl"
    src.write_text("".join(json.dumps({"prompt": f"question {i}"}) + "\n" for i in range(n)))
    prepare_prompts(str(src), str(tmp_path / "data"))
    return _snapshot(tmp_path / "data")


def _snapshot(directory):
    """Every file's bytes but the writer lock's (it names the last holder)."""
    return {
        str(p.relative_to(directory)): p.read_bytes()
        for p in directory.rglob("*")
        if p.is_file() and p.name != ".writer.lock"
    }


def test_an_empty_or_all_filtered_source_is_an_error_and_keeps_the_data(tmp_path):
    from rlaif_jax.errors import UserError

    before = _prepared(tmp_path)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(UserError, match=r"prepare_prompts.source = '.*empty.jsonl': holds no records"):
        prepare_prompts(str(empty), str(tmp_path / "data"))
    long = tmp_path / "long.jsonl"
    long.write_text(json.dumps({"prompt": "word " * 50}) + "\n")
    with pytest.raises(UserError, match=r"none of its 1 records was kept \(dropped: too_many_words=1\)"):
        prepare_prompts(str(long), str(tmp_path / "data"), max_words=10)
    assert _snapshot(tmp_path / "data") == before


def test_a_smaller_source_replaces_prepared_prompts_only_with_overwrite(tmp_path):
    from rlaif_jax.outputs import OutputWouldShrinkError

    before = _prepared(tmp_path, n=20)
    small = tmp_path / "small.jsonl"
    small.write_text("".join(json.dumps({"prompt": f"new {i}"}) + "\n" for i in range(3)))
    with pytest.raises(
        OutputWouldShrinkError,
        match=r"prompts/feedback holds a complete set of 18 records and "
        r"this run would replace it with 0; .*prepare_prompts.overwrite",
    ):
        prepare_prompts(str(small), str(tmp_path / "data"), sft_fraction=1.0)
    # every set is checked before any is written: the sft set (2 -> 3, allowed) is untouched
    assert _snapshot(tmp_path / "data") == before
    stats = prepare_prompts(str(small), str(tmp_path / "data"), sft_fraction=1.0, overwrite=True)
    assert (stats["sft"], stats["feedback"]) == (3, 0)


def test_prepare_prompts_settings_and_a_held_output_are_refused(tmp_path):
    from rlaif_jax.errors import ConfigError
    from rlaif_jax.outputs import OutputInUseError, writer_lock

    src = tmp_path / "p.jsonl"
    src.write_text(json.dumps({"prompt": "a"}) + "\n")
    with pytest.raises(ConfigError, match=r"prepare_prompts.sft_fraction = 1.5: must be in \[0.0, 1.0\]"):
        prepare_prompts(str(src), str(tmp_path / "out"), sft_fraction=1.5)
    with pytest.raises(ConfigError, match=r"prepare_prompts.format = 'csv': must be one of"):
        prepare_prompts(str(src), str(tmp_path / "out"), format="csv")
    with pytest.raises(ConfigError, match=r"prepare_prompts.source = 'nope.json': no such"):
        prepare_prompts("nope.json", str(tmp_path / "out"))
    with writer_lock(str(tmp_path / "out"), "prepare_prompts.output_dir"):
        with pytest.raises(OutputInUseError, match="prepare_prompts.output_dir"):
            prepare_prompts(str(src), str(tmp_path / "out"))
    assert not (tmp_path / "out" / "prompts").exists()


def test_sources_that_are_not_utf8_or_hold_arrays_name_file_and_line(tmp_path):
    from rlaif_jax.eval.evaluate import EvalInputError, load_eval_set

    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"prompt": "a"}\n{"prompt": "b"}\n{"prompt": "\xff"}\n')
    with pytest.raises(InputError, match=r"bad.jsonl: line 3 \(byte 44\) is not UTF-8 .*save the file as UTF-8"):
        read_prompt_source(bad)
    utf16 = tmp_path / "alpaca_eval.json"
    utf16.write_bytes(json.dumps([{"instruction": "hi", "output": "yo"}]).encode("utf-16"))
    with pytest.raises(EvalInputError, match=r"alpaca_eval.json: line 1 \(byte 0\) is not UTF-8"):
        load_eval_set(str(utf16))
    arrays = tmp_path / "arrays.jsonl"
    arrays.write_text('["a", "b"]\n["c"]\n')
    with pytest.raises(InputError, match=r"arrays.jsonl: line 1 is a JSON array, expected an object"):
        read_prompt_source(arrays)
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text('{"prompt": "a"}\n42\n')
    with pytest.raises(InputError, match=r"mixed.jsonl: line 2 is a JSON number, expected an object"):
        read_prompt_source(mixed)
    strings = tmp_path / "strings.json"
    strings.write_text('["a", "b"]')
    with pytest.raises(InputError, match=r"strings.json: record 0: cannot detect the format of a string record"):
        read_prompt_source(strings)


def test_paper_imports_refuse_empty_files_and_shrinking(tmp_path):
    from rlaif_jax.data.prompts import import_paper_annotations, import_paper_completions
    from rlaif_jax.errors import UserError
    from rlaif_jax.outputs import OutputWouldShrinkError

    (tmp_path / "none.json").write_text("[]")
    with pytest.raises(UserError, match=r"import_paper_completions.path = '.*none.json': holds no records"):
        import_paper_completions(str(tmp_path / "none.json"), str(tmp_path / "c"))
    with pytest.raises(UserError, match=r"import_paper_annotations.path = '.*none.json': holds no annotations"):
        import_paper_annotations(str(tmp_path / "none.json"), str(tmp_path / "a"))
    (tmp_path / "two.json").write_text(json.dumps([{"instruction": f"q{i}", "output": "x"} for i in range(2)]))
    (tmp_path / "one.json").write_text(json.dumps([{"instruction": "q0", "output": "x"}]))
    import_paper_completions(str(tmp_path / "two.json"), str(tmp_path / "c"))
    with pytest.raises(OutputWouldShrinkError, match="import_paper_completions.overwrite"):
        import_paper_completions(str(tmp_path / "one.json"), str(tmp_path / "c"))
    assert len(list(read_records(tmp_path / "c/demonstrations/all", DEMONSTRATIONS))) == 2


def test_prepare_data_script_exits_2_on_an_empty_file_and_keeps_the_data(tmp_path):
    import os
    import subprocess
    import sys

    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    before = _prepared(tmp_path)
    (tmp_path / "empty.jsonl").write_text("")
    r = subprocess.run(
        [
            sys.executable,
            os.path.join(repo, "scripts", "prepare_data.py"),
            "prepare_prompts",
            f"--gin_param=prepare_prompts.source='{tmp_path / 'empty.jsonl'}'",
            f"--gin_param=prepare_prompts.output_dir='{tmp_path / 'data'}'",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.strip().splitlines()[-1].startswith("error: prepare_prompts.source = ")
    assert "Traceback" not in r.stderr
    assert _snapshot(tmp_path / "data") == before
