"""The paper's released files, in their released shapes and names (tests/released_files.py),
import into record sets with matched / dropped counts; the 'paper' pairing rebuilds exactly
the pairs of the paper's loader; a malformed file stops with one `error:` line naming the
file and the record."""

import importlib.util
import json
import os
import re

import pytest

from rlaif_jax.cli import run
from rlaif_jax.data.prompts import import_paper_annotations, import_paper_completions, prepare_prompts
from rlaif_jax.data.prompts.imports import imported_preferences
from rlaif_jax.data.records import COMPARISONS, DEMONSTRATIONS, PREFERENCES, PROMPTS, read_manifest, read_records
from rlaif_jax.synthetic.released_files import write_released

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PROMPTS_TEXT = [f"question {i}" for i in range(20)]
REPLIES = [f"chatgpt reply {i}" for i in range(20)]
SPECIAL = ("<s>", "</s>", "<|endoftext|>")


@pytest.fixture
def released(tmp_path):
    paths = write_released(str(tmp_path / "released"), PROMPTS_TEXT, REPLIES)
    # max_words=20 drops LONG, which the paper's length limit keeps: a prompt a bound on
    # prepare_prompts removed.
    stats = prepare_prompts(paths["sharegpt"], str(tmp_path / "data"), format="sharegpt", max_words=20)
    return {**paths, "data": str(tmp_path / "data"), "tmp": tmp_path, "prepared": stats}


def paper_sharegpt4_reference(path):
    """What the paper's get_sharegpt4 trains on, from its described behaviour: the items of
    the object, the prompt "Human: {instruction}\\n\\nAssistant: ", target completions[0]."""
    with open(path) as f:
        items = list(json.load(f).items())
    return {"Human: " + k + "\n\nAssistant: ": v[0] for k, v in items}


def paper_aiprefs_reference(path):
    """The paper's get_sharegpt_aiprefs, from its described behaviour: special-token records
    skipped; the pair keyed by its prompt (a later record replaces an earlier one in place);
    output_1 chosen when preference == 1, output_2 otherwise. Returns (instruction, chosen,
    rejected) in the loader's order."""
    with open(path) as f:
        rows = json.load(f)
    data = {}
    for row in rows:
        if any(s in row[k] for k in ("instruction", "output_1", "output_2") for s in SPECIAL):
            continue
        prompt = "Human: " + row["instruction"] + "\n\nAssistant: "
        responses = [row["output_1"], row["output_2"]]
        pairs = [(0, 1)] if row["preference"] == 1 else [(1, 0)]
        data[prompt] = {"responses": responses, "pairs": pairs}
    out = []
    for prompt, d in data.items():
        (c, r) = d["pairs"][0]
        out.append((prompt[len("Human: ") : -len("\n\nAssistant: ")], d["responses"][c], d["responses"][r]))
    return out


def test_sharegpt_as_released_is_prepared(released):
    stats = released["prepared"]
    assert stats["sft"] == 2 and stats["feedback"] == 18
    assert read_manifest(os.path.join(released["data"], "prompts", "feedback"))["provenance"]["counts"] == stats
    assert stats["dropped"] == {
        "duplicate": 1,
        "first_turn_not_human": 1,
        "no_assistant_reply": 1,
        "special_token": 1,
        "starts_with_assistant": 1,
        "too_many_words": 1,
    }


def test_object_form_completions_import_with_matched_and_unmatched_counts(released):
    out = str(released["tmp"] / "gpt4")
    stats = import_paper_completions(released["gpt4"], out, source_model="gpt-4-0314", prompts_dir=released["data"])
    assert stats["shape"] == "object" and stats["read"] == 24 and stats["extra_completions"] == 1
    assert stats["matched"] == 19 and stats["matched_by_split"] == {"sft": 2, "feedback": 17}
    assert stats["unmatched"] == {
        "filtered_by_prepare": 1,  # LONG: max_words=20 here, under the paper's 2000
        "first_turn_not_human": 1,  # "sys question": the paper's loader skips a system turn
        "merged_human_turns": 1,  # "part one\n\nAssistant: part two"
        "not_in_source": 1,
        "whitespace_differs": 1,
    }
    assert stats["dropped"] == {"not_in_prompts": 5} and stats["kept"] == 19
    sft = list(read_records(os.path.join(out, "demonstrations", "sft"), DEMONSTRATIONS))
    feedback = list(read_records(os.path.join(out, "demonstrations", "feedback"), DEMONSTRATIONS))
    sft_ids = [r["prompt_id"] for r in read_records(os.path.join(released["data"], "prompts", "sft"), PROMPTS)]
    assert [d["prompt_id"] for d in sft] == sft_ids  # the same 10% as the GPT-3.5 arm
    # Each demonstration is the completion the paper's loader trains on for that prompt.
    reference = paper_sharegpt4_reference(released["gpt4"])
    for d in sft + feedback:
        assert d["completion"] == reference["Human: " + d["prompt"] + "\n\nAssistant: "]
        assert d["source_model"] == "gpt-4-0314" and d["finish_reason"] == "unknown"
    assert {d["prompt"] for d in sft + feedback} == set(PROMPTS_TEXT) - {PROMPTS_TEXT[7]}
    manifest = read_manifest(os.path.join(out, "demonstrations", "sft"))
    assert manifest["provenance"]["import"]["unmatched"] == stats["unmatched"]
    with open(os.path.join(out, "stats.json")) as f:
        assert json.load(f) == stats
    # The paper's own length limit: LONG then matches.
    again = import_paper_completions(
        released["gpt4"], str(released["tmp"] / "gpt4_all"), prompts_dir=released["data"], explain_unmatched=False
    )
    assert again["unmatched"] == {"not_in_prompts": 5}


def test_annotations_as_alpaca_eval_writes_them(released):
    out = str(released["tmp"] / "ann")
    stats = import_paper_annotations(released["annotations"], out)
    comps = list(read_records(os.path.join(out, "comparisons"), COMPARISONS))
    # 1.0 / 2.0 decided; 1.5 and alpaca_eval's 0.0 (identical outputs) ties; null and NaN unparsed.
    assert len(comps) == 25 and stats["verdicts"] == {"first": 9, "second": 8, "tie": 4, "invalid": 4}
    assert stats["dropped"] == {"invalid": 4, "tie": 4}
    assert comps[0]["model_1"] == "chatgpt" and comps[0]["model_2"] == "mistral7bsft" and comps[0]["judge"] == "gpt4_1"
    assert json.loads(comps[-1]["raw_judge_text"]) == {"ordered_models": [{"model": "m", "rank": 1}]}
    prefs = list(read_records(os.path.join(out, "preferences"), PREFERENCES))
    assert len(prefs) == stats["kept"] == 17
    assert all(p["chosen"] != p["rejected"] for p in prefs)
    assert (prefs[0]["chosen"], prefs[1]["chosen"]) == ("chatgpt 0", "sft sample 1")  # 1.0 -> output_1, 2.0 -> output_2
    assert read_manifest(os.path.join(out, "preferences"))["provenance"]["import"]["dropped"] == stats["dropped"]

    # Only the pairs of the feedback 90%: the SFT split's and unknown prompts' counted.
    fb = import_paper_annotations(
        released["annotations"], str(released["tmp"] / "ann_fb"), prompts_dir=released["data"]
    )
    assert fb["other_split"] == {"sft": 2} and fb["unmatched"] == {"not_in_source": 1}
    assert fb["dropped"]["other_split"] == 2 and fb["dropped"]["not_in_prompts"] == 1 and fb["kept"] == 14


def test_paper_pairing_reproduces_the_papers_loader(released):
    out = str(released["tmp"] / "ann_paper")
    stats = import_paper_annotations(released["annotations"], out, pairing="paper")
    prefs = list(read_records(os.path.join(out, "preferences"), PREFERENCES))
    assert [(p["prompt"], p["chosen"], p["rejected"]) for p in prefs] == paper_aiprefs_reference(
        released["annotations"]
    )
    # Ties (1.5 and alpaca_eval's 0.0) and unparsed answers (null, NaN) became "output 2 wins".
    assert stats["paper_relabelled"] == {"tie_as_second": 4, "invalid_as_second": 4, "identical_kept": 1}
    assert stats["dropped"] == {"duplicate_instruction_replaced": 3, "special_token": 1} and stats["pairing"] == "paper"
    assert any(p["chosen"] == p["rejected"] == "same" for p in prefs)
    # The default keeps none of them.
    strict = import_paper_annotations(released["annotations"], str(released["tmp"] / "ann_strict"))
    assert strict["kept"] < stats["kept"] and "paper_relabelled" not in strict


def test_an_arm_hook_imports_the_annotations_once(released):
    out = str(released["tmp"] / "arm_ann")
    prefs = imported_preferences(released["annotations"], out, pairing="paper", num_shards=2)
    manifest = read_manifest(prefs, PREFERENCES)
    assert manifest["num_records"] == 21 and manifest["provenance"]["pairing"] == "paper"
    mtime = os.path.getmtime(os.path.join(prefs, "manifest.json"))
    assert imported_preferences(released["annotations"], out, pairing="paper") == prefs
    assert os.path.getmtime(os.path.join(prefs, "manifest.json")) == mtime  # reused, not redone


def _prepare_data(argv, capsys):
    spec = importlib.util.spec_from_file_location("prepare_data", os.path.join(ROOT, "scripts", "prepare_data.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    code = run(mod.main, argv)
    return code, capsys.readouterr().err


def _truncate(path):
    with open(path) as f:
        text = f.read()
    with open(path, "w") as f:
        f.write(text[: len(text) * 2 // 3])


@pytest.mark.parametrize(
    "what, stage, match",
    [
        ("truncated sharegpt", "prepare_prompts", r"invalid JSON at line \d+ col \d+ \(in record 1[0-9]\)"),
        ("truncated completions", "import_paper_completions", r"invalid JSON at line \d+ col \d+ \(in record 1[0-9]\)"),
        ("completion not a list", "import_paper_completions", r"record 1 \(instruction 'question 1'\): expected a non"),
        ("completion not a string", "import_paper_completions", r"record 0 \(instruction 'question 0'\): completion 0"),
        ("truncated annotations", "import_paper_annotations", r"invalid JSON at line \d+ col \d+ \(in record 1[0-9]\)"),
        ("weighted preference", "import_paper_annotations", r"record 2: field 'preference'=1.7 is not 1, 2, 1.5"),
        ("annotations as an object", "import_paper_annotations", r"top-level JSON object; an annotations file is"),
    ],
)
@pytest.mark.usefixtures("clean_gin")
def test_a_malformed_released_file_is_one_error_line(released, capsys, what, stage, match):
    key = {"prepare_prompts": "sharegpt", "import_paper_completions": "gpt4"}.get(stage, "annotations")
    path = released[key]
    with open(path) as f:
        value = json.load(f)
    if what.startswith("truncated"):
        _truncate(path)
    elif what == "completion not a list":
        value["question 1"] = "a bare string"
    elif what == "completion not a string":
        value["question 0"] = [{"text": "x"}]
    elif what == "weighted preference":
        value[2]["preference"] = 1.7
    elif what == "annotations as an object":
        value = {"annotations": value}
    if not what.startswith("truncated"):
        with open(path, "w") as f:
            json.dump(value, f, indent=2)
    out = str(released["tmp"] / "out")
    field = "source" if stage == "prepare_prompts" else "path"
    code, err = _prepare_data(
        [stage, f"--gin_param={stage}.{field}='{path}'", f"--gin_param={stage}.output_dir='{out}'"], capsys
    )
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1, err
    assert lines[0].startswith(f"error: {path}: ") and re.search(match, lines[0]), lines[0]
    assert not os.path.exists(os.path.join(out, "stats.json"))
