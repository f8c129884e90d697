"""The released-data DPO arm (configs/experiments/paper/released/dpo_gpt4_on_sft_gpt35_10pct.gin)
end to end on the tiny model, as written but for paths and sizes: the released ShareGPT file
prepared, SFT on its 10%, the released GPT-4 annotations imported and trained on with DPO,
both policies judged by a judge served on 127.0.0.1 (the synthetic critic standing in for
a local model). No network, no key: nothing may ask a teacher or critic API."""

import json
import os

import gin
import pytest

from rlaif_jax.data.prompts import import_paper_annotations
from rlaif_jax.data.records import read_manifest
from rlaif_jax.feedback.server import ServerThread, make_app
from rlaif_jax.pipeline import run_arm
from rlaif_jax.synthetic.backend import SyntheticBackend
from rlaif_jax.synthetic.models import Critic
from rlaif_jax.synthetic.released_files import write_released_inputs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE = "configs/experiments/paper/released/dpo_gpt4_on_sft_gpt35_10pct.gin"
TINY = "configs/experiments/paper/released/tiny.gin"

pytestmark = pytest.mark.usefixtures("clean_gin")


@pytest.mark.parametrize(
    "stages",
    [
        # The default suite skips the SFT stage's compile: the base model stands in for the
        # SFT policy (run_arm.sft_policy), the rest runs as the recipe writes it.
        ["prompts", "dpo", "evaluate"],
        pytest.param(None, marks=pytest.mark.slow, id="as_written"),
    ],
    ids=lambda s: "+".join(s) if s else None,
)
def test_released_dpo_arm_runs_end_to_end_without_network_or_key(tmp_path, monkeypatch, stages):
    for key in ("OPENAI_API_KEY", "ANTHROPIC_API_KEY", "GATEWAY_API_KEY", "LOCAL_JUDGE_API_KEY"):
        monkeypatch.delenv(key, raising=False)
    files = write_released_inputs(str(tmp_path / "world"), num_prompts=80, num_eval=8, hidden_size=32, num_layers=1)
    arm_dir, data_dir, ann_dir = tmp_path / "arm", tmp_path / "data", tmp_path / "annotations_gpt4"
    with ServerThread(make_app(SyntheticBackend({"critic": Critic()}))) as srv:
        old = os.getcwd()
        os.chdir(ROOT)
        try:
            gin.parse_config_files_and_bindings(
                [RECIPE, TINY],  # the recipe at toy size, with this test's paths
                [
                    f"HF_DIR = '{files['base_model']}'",
                    f"ARM_DIR = '{arm_dir}'",
                    f"DATA_DIR = '{data_dir}'",
                    f"SHAREGPT_JSON = '{files['sharegpt']}'",
                    f"GPT4_COMPLETIONS = '{files['gpt4']}'",
                    f"RELEASED_ANNOTATIONS = '{files['annotations']}'",
                    f"RELEASED_ANNOTATIONS_DIR = '{ann_dir}'",
                    f"RELEASED_PREFERENCES = '{ann_dir / 'preferences'}'",
                    f"ALPACA_EVAL_JSON = '{files['eval_set']}'",
                    f"JUDGE_URL = '{srv.url}'",
                    "make_mesh.data = -1",  # the 8 CPU devices of the test session
                    *([f"run_arm.stages = {stages}", "run_arm.evaluate_sft = False"] if stages else []),
                ],
                skip_unknown=False,
            )
        finally:
            os.chdir(old)
        imported = import_paper_annotations()  # the recipe's first command
        summary = run_arm()  # its second

    # The annotations: ties and unparsed answers dropped and counted (the default pairing).
    assert imported["dropped"] == {"invalid": 14, "tie": 14} and imported["kept"] == 57
    with open(arm_dir / "status.json") as f:
        assert json.load(f)["stages"].keys() == set(stages or ["prompts", "sft", "dpo", "evaluate"])
    with open(arm_dir / "status.json") as f:
        assert {v["state"] for v in json.load(f)["stages"].values()} == {"done"}
    with open(data_dir / "stats.json") as f:
        prepared = json.load(f)
    assert prepared["sft"] == 8 and prepared["dropped"]["special_token"] == 1
    # DPO trained on the imported pairs, from the SFT policy; both policies were judged.
    dpo_config = (arm_dir / "dpo" / "config.gin").read_text()
    assert "DPO.beta = 0.05" in dpo_config and "dpo/make_optimizer.learning_rate = 1e-07" in dpo_config
    assert summary["dpo/step"] > 0 and "dpo/rewards/accuracies" in summary
    assert "eval/win_rate" in summary and ("eval_sft/win_rate" in summary) == (stages is None)
    assert "NOT the paper" in summary["judge"]  # a local judge's numbers are not the paper's
    assert read_manifest(ann_dir / "preferences")["num_records"] == 57
    # Only the judge was asked anything: no teacher or critic cache exists.
    assert {f for f in os.listdir(data_dir / "api_cache") if not f.endswith(".lock")} == {"judge.jsonl"}
