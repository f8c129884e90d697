"""Unpaired labelled completions: the critic's rating -> label rule and its counts, the
preference-pair converter, and the KTO batches with their mismatched KL rows."""

import json

import numpy as np
import pytest

from rlaif_jax.data.pipeline.builders import labelled_pipeline
from rlaif_jax.data.records import COMPARISONS, LABELLED, PREFERENCES, read_manifest, read_records, write_records
from rlaif_jax.data.toy import write_toy_world
from rlaif_jax.errors import ConfigError, UserError
from rlaif_jax.feedback.ratings import (
    labelled_from_ratings,
    rating_label,
    rating_labels_stage,
    unpair_preferences_stage,
)


def test_rating_label_threshold_rule():
    assert [rating_label(r, 3) for r in (1, 2, 3, 4, 5)] == [0, 0, None, 1, 1]
    assert [rating_label(r, 3.5) for r in (3, 4)] == [0, 1]
    assert rating_label(None, 3) is None and rating_label(float("nan"), 3) is None and rating_label(True, 3) is None


def _comp(pid, ratings, judge="critic"):
    c = {"prompt_id": pid, "prompt": f"p{pid}", "response_1": f"a{pid}", "response_2": f"b{pid}", "judge": judge}
    c.update(model_1="m1", model_2="m2")
    if ratings is not None:
        c["ratings"] = ratings
    return c


def test_labelled_from_ratings_counts_every_drop():
    comps = [_comp("0", [5, 1]), _comp("1", [3, 4]), _comp("2", [None, 2]), _comp("3", None)]
    records, counts = labelled_from_ratings(comps, 3)
    assert counts == {"responses": 8, "desirable": 2, "undesirable": 2, "ties": 1, "invalid": 1, "unrated": 2}
    assert [(r["completion"], r["label"], r["rating"]) for r in records] == [
        ("a0", 1, 5.0),
        ("b0", 0, 1.0),
        ("b1", 1, 4.0),
        ("b2", 0, 2.0),
    ]
    assert records[0]["source"] == "critic critic: rating 5 vs threshold 3" and records[1]["source_model"] == "m2"


def _critic_dir(root, mode, comps):
    recs = [
        {**{k: c[k] for k in ("prompt_id", "prompt", "response_1", "response_2", "judge")}, "model_1": None}
        | {"model_2": None, "verdict": "tie", "raw_judge_text": "", "swapped": 0}
        for c in comps
    ]
    write_records(root, COMPARISONS, recs, provenance={"mode": mode})
    with open(root / "comparisons.jsonl", "w") as f:
        f.writelines(json.dumps(c) + "\n" for c in comps)
    return str(root)


def test_rating_labels_stage_writes_records_and_counts(tmp_path):
    critic = _critic_dir(tmp_path / "critic", "rating", [_comp("0", [5, 1]), _comp("1", [3, None])])
    m = rating_labels_stage(comparisons=critic, out_dir=str(tmp_path / "labels"))
    recs = list(read_records(tmp_path / "labels", LABELLED))
    assert [r["label"] for r in recs] == [1, 0] and m["num_records"] == 2
    counts = read_manifest(tmp_path / "labels")["provenance"]["counts"]
    assert counts["ties"] == 1 and counts["invalid"] == 1
    assert json.load(open(tmp_path / "labels" / "report.json")) == counts
    second = _critic_dir(tmp_path / "critic2", "rating", [_comp("2", [4, 2])])
    both = rating_labels_stage(comparisons=[critic, second], out_dir=str(tmp_path / "both"))
    assert both["num_records"] == 4 and both["provenance"]["counts"]["responses"] == 6
    pairwise = _critic_dir(tmp_path / "pairwise", "pairwise", [_comp("0", None)])
    with pytest.raises(UserError, match="rating_labels_stage.comparisons.*critic_rating.gin"):
        rating_labels_stage(comparisons=pairwise, out_dir=str(tmp_path / "x"))
    only_ties = _critic_dir(tmp_path / "ties", "rating", [_comp("0", [3, 3])])
    with pytest.raises(UserError, match="no labelled completion"):
        rating_labels_stage(comparisons=only_ties, out_dir=str(tmp_path / "y"))


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy")
    w = write_toy_world(str(root), 12)
    unpair_preferences_stage(preferences=w["preferences"], out_dir=str(root / "labelled"))
    return w, str(root / "labelled")


def test_unpairing_preferences_as_trl(toy):
    w, labelled = toy
    pairs = list(read_records(w["preferences"], PREFERENCES))
    recs = list(read_records(labelled, LABELLED))
    assert len(recs) == 2 * len(pairs)
    assert [(r["completion"], r["label"]) for r in recs[:2]] == [(pairs[0]["chosen"], 1), (pairs[0]["rejected"], 0)]


def test_labelled_batches_carry_labels_and_cycled_kl_rows(toy):
    w, labelled = toy
    it = labelled_pipeline(
        labelled, w["tok"], batch_size=4, seq_len=48, max_length=48, max_prompt_length=24, shuffle=False, prefetch=0
    )
    b = next(it)
    it.close()
    assert b["label"].tolist() == [1, 0, 1, 0]
    for j in range(4):
        prompt_len = int(np.argmax(b["loss_mask"][j]))  # the response starts where the mask does
        kl_prompt_len = int(np.argmax(b["kl_loss_mask"][j]))
        assert kl_prompt_len == prompt_len
        np.testing.assert_array_equal(b["kl_tokens"][j, :prompt_len], b["tokens"][j, :prompt_len])
        prev = (j - 1) % 4
        resp = b["tokens"][prev][b["loss_mask"][prev] > 0]
        np.testing.assert_array_equal(b["kl_tokens"][j][b["kl_loss_mask"][j] > 0], resp)
    with pytest.raises(ConfigError, match="labelled_pipeline.batch_size"):
        labelled_pipeline(labelled, w["tok"], batch_size=1, seq_len=48, max_length=48, max_prompt_length=24)
