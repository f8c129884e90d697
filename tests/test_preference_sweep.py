"""configs/sweeps/tiny_preference_loss.yaml: every run's gin (files + bindings, as the sweep
would launch it) parses and builds the objective and pipeline it names, with the grid's beta."""

import os

import gin
import pytest

from rlaif_jax.sweep import expand, load_sweep
from rlaif_jax.train import CPO, DPO, KTO, ORPO

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SWEEP = os.path.join(ROOT, "configs", "sweeps", "tiny_preference_loss.yaml")

pytestmark = pytest.mark.usefixtures("clean_gin")


def test_every_run_builds_its_objective_with_the_grid_beta():
    runs = expand(load_sweep(SWEEP))
    assert len(runs) == 12
    seen = set()
    old = os.getcwd()
    os.chdir(ROOT)
    try:
        for r in runs:
            files = [a.split("=", 1)[1] for a in r.command if a.startswith("--gin_file=")]
            params = [a.split("=", 1)[1] for a in r.command if a.startswith("--gin_param=")]
            gin.clear_config()
            gin.parse_config_files_and_bindings(files, params, skip_unknown=False, finalize_config=False)
            objective = gin.query_parameter("train.objective").scoped_configurable_fn()
            data = gin.query_parameter("train.train_data").selector
            assert objective.beta == r.point["BETA"], r.name
            assert data == ("labelled_pipeline" if isinstance(objective, KTO) else "preference_pipeline"), r.name
            seen.add((type(objective), getattr(objective, "loss_type", None)))
    finally:
        os.chdir(old)
    assert seen == {
        (DPO, "sigmoid"),
        (KTO, "kto"),
        (ORPO, None),
        (CPO, "sigmoid"),
        (CPO, "simpo"),
        (CPO, "alphapo"),
    }
