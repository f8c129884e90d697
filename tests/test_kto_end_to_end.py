"""The critic's rating mode -> labelled completions -> KTO training, end to end: the synthetic
critic rates a weak and a strong teacher's answers over the OpenAI-compatible API on
127.0.0.1, rating_labels_stage labels them by the threshold, and `train` runs KTO on the tiny
base model from those records."""

import functools
import json
import os
import random

import jax
import numpy as np

from rlaif_jax import sharding as shd
from rlaif_jax.data.ids import prompt_id
from rlaif_jax.data.pipeline.builders import labelled_pipeline
from rlaif_jax.data.records import LABELLED, read_manifest, read_records
from rlaif_jax.feedback.client import FeedbackClient
from rlaif_jax.feedback.ratings import rating_labels_stage
from rlaif_jax.feedback.server import ServerThread, make_app
from rlaif_jax.feedback.settings import JudgeSettings
from rlaif_jax.feedback.stages import critic_stage
from rlaif_jax.synthetic.arm_inputs import write_arm_inputs
from rlaif_jax.synthetic.backend import synthetic_world
from rlaif_jax.train import KTO
from rlaif_jax.train.loop import LoopSettings, train
from rlaif_jax.train.metrics import read_jsonl


def _demos(path, rows):
    with open(path, "w") as f:
        for prompt, completion in rows:
            f.write(json.dumps({"prompt_id": prompt_id(prompt), "prompt": prompt, "completion": completion}) + "\n")
    return str(path)


def test_critic_ratings_to_kto_training(tmp_path, monkeypatch):
    monkeypatch.setenv("RLAIF_TEST_KEY", "sk-test")
    paths = write_arm_inputs(str(tmp_path / "world"), num_prompts=12, num_eval=1, hidden_size=32, num_layers=1)
    with open(paths["prompts"]) as f:
        rows = json.load(f)
    world = synthetic_world(critic_noise=0.0)
    strong, rng = world.models["strong-teacher"], random.Random(0)
    weak = _demos(tmp_path / "weak.jsonl", [(r["instruction"], r["output"]) for r in rows])
    good = _demos(tmp_path / "strong.jsonl", [(r["instruction"], strong.answer(r["instruction"], rng)) for r in rows])
    with ServerThread(make_app(world)) as srv:
        client = FeedbackClient(
            model="critic",
            cache_path=str(tmp_path / "cache.jsonl"),
            base_url=srv.url,
            api_key_env="RLAIF_TEST_KEY",
            progress=False,
        )
        critic_stage(
            responses_1=weak,
            responses_2=good,
            out_dir=str(tmp_path / "critic"),
            client=client,
            judge=JudgeSettings(mode="rating", template="rating_v1", max_tokens=8),
        )
    m = rating_labels_stage(comparisons=str(tmp_path / "critic"), out_dir=str(tmp_path / "labelled"), threshold=3)
    counts = read_manifest(tmp_path / "labelled")["provenance"]["counts"]
    recs = list(read_records(tmp_path / "labelled", LABELLED))
    assert counts["responses"] == 24 and m["num_records"] == len(recs) == counts["desirable"] + counts["undesirable"]
    assert counts["desirable"] and counts["undesirable"]
    assert len(recs) + counts["ties"] + counts["invalid"] + counts["unrated"] == 24

    run = str(tmp_path / "kto")
    out = train(
        run_dir=run,
        objective=KTO(beta=0.1),
        train_data=functools.partial(
            labelled_pipeline,
            str(tmp_path / "labelled"),
            batch_size=4,
            seq_len=160,
            max_length=160,
            max_prompt_length=96,
        ),
        num_steps=3,
        init_from=paths["base_model"],
        mesh=functools.partial(shd.make_mesh, 1, 1, 1, devices=jax.devices()[:1]),
        loop=LoopSettings(log_every=1, export_hf=False),
    )
    logged = [r for r in read_jsonl(os.path.join(run, "metrics.jsonl")) if "loss" in r]
    assert len(logged) == 3 and out["step"] == 3
    # step 1: the policy is the reference, so every log-ratio and the KL estimate are 0
    assert logged[0]["kl"] == 0.0 and abs(logged[0]["loss"] - 0.5) < 1e-6
    for key in ("kl", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "kto_loss"):
        assert np.isfinite(out[key]), key
    assert logged[-1]["loss"] != logged[0]["loss"]
