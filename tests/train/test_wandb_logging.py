"""Weights & Biases beside the JSONL and TensorBoard: the same metric names and values, in
offline mode (no network); and a clear error where wandb is not installed."""

import glob
import os
import sys

import pytest

from rlaif_jax.train.metrics import MetricsWriter, WandbLogging, read_jsonl


def test_missing_wandb_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    with pytest.raises(ImportError, match=r"pip install -e \".\[wandb\]\""):
        MetricsWriter(str(tmp_path), wandb=WandbLogging(enabled=True, mode="offline"))


def test_disabled_by_default(tmp_path):
    w = MetricsWriter(str(tmp_path))
    w.write(1, {"loss": 1.0})
    w.close()
    assert not os.path.exists(tmp_path / "wandb") and not os.path.exists(tmp_path / "wandb_run_id.txt")


def test_offline_run_has_the_jsonl_metrics(tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="the wandb extra: pip install -e '.[wandb]'")
    for k, v in {
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "WANDB_DISABLE_GIT": "true",
        "WANDB_CONFIG_DIR": str(tmp_path / "cfg"),
        "WANDB_CACHE_DIR": str(tmp_path / "cache"),
        "WANDB_DATA_DIR": str(tmp_path / "data"),
    }.items():
        monkeypatch.setenv(k, v)
    run = tmp_path / "run"
    w = MetricsWriter(str(run), wandb=WandbLogging(enabled=True, project="rlaif-test", mode="offline"))
    w.write(1, {"loss": 2.5, "rewards/margins": 0.25})
    w.write(2, {"loss": 1.5, "rewards/margins": 0.5})
    w.write(2, {"win_rate": 61.0}, prefix="eval/")
    w.text(2, "samples", "red <green> blue")
    w.write(3, {"loss": 0.5})  # W&B commits a step when the next one starts
    # the values of step 2, under the JSONL's own names
    summary = dict(w._wandb.summary)
    assert summary["loss"] == 1.5 and summary["rewards/margins"] == 0.5 and summary["eval/win_rate"] == 61.0
    w.close()
    rows = read_jsonl(str(run / "metrics.jsonl"))
    assert [r["loss"] for r in rows if "loss" in r] == [2.5, 1.5, 0.5]
    offline = glob.glob(str(run / "wandb" / "offline-run-*"))
    assert len(offline) == 1
    run_id = (run / "wandb_run_id.txt").read_text().strip()
    assert offline[0].endswith(run_id)
    # the history went to the offline run's transaction log (for `wandb sync`)
    log = open(glob.glob(os.path.join(offline[0], "*.wandb"))[0], "rb").read()
    assert all(k.encode() in log for k in ("loss", "rewards/margins", "eval/win_rate"))

    # a resumed run continues the same W&B run
    w = MetricsWriter(str(run), wandb=WandbLogging(enabled=True, project="rlaif-test", mode="offline"))
    w.write(4, {"loss": 1.0})
    w.close()
    assert (run / "wandb_run_id.txt").read_text().strip() == run_id
    assert all(p.endswith(run_id) for p in glob.glob(str(run / "wandb" / "offline-run-*")))
