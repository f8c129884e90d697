"""The run preflight's checks on their own (rlaif_jax.preflight); the runs that use them are
in tests/faults/test_bad_input.py."""

import json

import pytest

from rlaif_jax.data.records import PREFERENCES, read_records, write_records
from rlaif_jax.errors import ConfigError
from rlaif_jax.preflight import (
    PreflightError,
    PreflightSettings,
    pipeline_checks,
    record_set_check,
    run_preflight,
)
from tests.train.fixtures import make_world, tiny_config


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tok, tok_dir, demos, prefs = make_world(str(tmp_path_factory.mktemp("world")))
    return dict(vocab=len(tok), tok_dir=tok_dir, prefs=prefs)


def test_a_pipeline_preflight_reports_every_problem_one_line_each(world, tmp_path):
    rows = list(read_records(world["prefs"], PREFERENCES))
    tied = str(tmp_path / "tied")
    write_records(tied, PREFERENCES, [dict(r, rejected=r["chosen"]) for r in rows])
    models = {
        "run_arm.base_model": tiny_config(world["vocab"] - 4),  # smaller than the tokenizer
        "run_arm.reward_model": tiny_config(world["vocab"] + 4),  # another vocabulary
    }
    checks = pipeline_checks(
        models, world["tok_dir"], "run_arm.tokenizer", {"run_arm.preferences": (tied, PREFERENCES)}
    )
    with pytest.raises(PreflightError) as e:
        run_preflight(checks)
    problems = e.value.problems
    assert len(problems) == 3, problems
    n = world["vocab"] - 4
    assert f"run_arm.base_model (model_config) has {n} embeddings but run_arm.tokenizer" in problems[0]
    assert "run_arm.base_model (model_config) and run_arm.reward_model (model_config) have different" in problems[1]
    assert problems[2].startswith(f"run_arm.preferences = {tied!r}: {len(rows)} of {len(rows)} preference pairs")
    assert str(e.value).endswith("(+2 more problem(s), each on its own line)")
    assert all("\n" not in p and len(p) < 300 for p in problems)


def test_a_jsonl_record_set_with_two_prompts_under_one_id(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt_id": "x", "prompt": p}) + "\n" for p in ("a", "b")))
    (finding,) = record_set_check(str(path), None, "run_arm.prompts").run()
    assert finding.fatal and "prompt_id 'x' is given to 2 different prompts" in finding.message


def test_the_thresholds_are_checked():
    with pytest.raises(ConfigError, match="warn_identical_share"):
        PreflightSettings(max_identical_share=0.1, warn_identical_share=0.5)
