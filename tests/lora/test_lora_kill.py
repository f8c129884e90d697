"""A LoRA DPO run killed (kill -9) mid-step through scripts/train.py and rerun with the same
command ends bit-identical to an uninterrupted run (the checkpoints hold only the adapters;
the base is reloaded from the run's pointer). Harness: tests/faults/test_training_faults.py."""

import numpy as np
import pytest
from safetensors.numpy import load_file

from rlaif_jax.train.metrics import read_jsonl
from tests.faults.test_training_faults import Launch, _complete_steps, _in_process, _rows, no_orphans  # noqa: F401
from tests.faults.test_training_faults import _gin as _faults_gin
from tests.train.fixtures import make_world

STEPS, EVERY = 8, 4


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tok, tok_dir, _, prefs = make_world(str(tmp_path_factory.mktemp("world")))
    return dict(vocab=len(tok), tok_dir=tok_dir, prefs=prefs)


def _gin(tmp_path, world, run_dir) -> str:
    return _faults_gin(
        tmp_path,
        world,
        run_dir,
        "DPO",
        "preference_pipeline",
        world["prefs"],
        "LoraSettings.rank = 4\nLoraSettings.dropout = 0.1\n",
        steps=STEPS,
    )


@pytest.mark.slow  # two launches of scripts/train.py and an in-process run
def test_killed_lora_dpo_run_resumes_bit_identically(world, tmp_path):
    straight = tmp_path / "straight"
    (tmp_path / "s").mkdir()
    _in_process(_gin(tmp_path / "s", world, straight), straight)
    run = tmp_path / "run"
    gin_file = _gin(tmp_path, world, run)
    first = Launch(gin_file, tmp_path, "1")
    first.kill_when(lambda: _rows(run) >= EVERY + 2 and _complete_steps(run))
    assert not (run / "hf").exists()
    last = Launch(gin_file, tmp_path, "2")
    assert last.wait() == 0, last.stderr()[-3000:]
    assert f"at step {EVERY}" in last.stderr()
    for name in ("model.safetensors", "peft_adapter/adapter_model.safetensors"):
        a, b = load_file(str(straight / "hf" / name)), load_file(str(run / "hf" / name))
        assert set(a) == set(b)
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    steps = [r["step"] for r in read_jsonl(str(run / "metrics.jsonl"))]
    assert steps == [r["step"] for r in read_jsonl(str(straight / "metrics.jsonl"))] == list(range(1, STEPS + 1))
