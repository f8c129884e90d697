"""Model and mesh gin files parse, build, and reject typos."""

import os

import gin
import jax
import pytest

from rlaif_jax import sharding as shd
from rlaif_jax.models import DecoderConfig, build_model, init_params

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "..", "configs")


pytestmark = pytest.mark.usefixtures("clean_gin")


def test_tiny_model_and_mesh_files_build():
    gin.parse_config_files_and_bindings(
        [os.path.join(CONFIGS, "models", "tiny_llama.gin"), os.path.join(CONFIGS, "mesh", "fsdp_all.gin")],
        ["custom_model_config.num_layers = 3"],
    )
    cfg = gin.query_parameter("%MODEL_CONFIG").scoped_configurable_fn()
    assert isinstance(cfg, DecoderConfig) and cfg.num_layers == 3 and cfg.num_kv_heads == 2
    mesh = shd.make_mesh()
    assert dict(mesh.shape) == {"data": 1, "fsdp": jax.device_count(), "tensor": 1}
    params = init_params(build_model(cfg, layout=shd.Layout(mesh, shd.logical_rules())), jax.random.key(0))
    assert params["layers"]["mlp"]["up_proj"]["kernel"].shape == (3, 64, 176)


def test_tiny_mixtral_builds_on_a_mesh():
    gin.parse_config_files_and_bindings([os.path.join(CONFIGS, "models", "tiny_mixtral.gin")], [])
    cfg = gin.query_parameter("%MODEL_CONFIG").scoped_configurable_fn()
    assert cfg.is_moe and (cfg.num_experts, cfg.num_experts_per_tok, cfg.moe_impl) == (4, 2, "ragged")
    mesh = shd.make_mesh(1, 4, 2)
    params = init_params(build_model(cfg, layout=shd.Layout(mesh, shd.logical_rules())), jax.random.key(0))
    w = params["layers"]["moe"]["gate_proj"]
    assert w.shape == (2, 4, 64, 128) and tuple(w.sharding.spec) == (None, None, "fsdp", "tensor")
    assert "mlp" not in params["layers"]


def test_typos_fail_at_start_up():
    # An unknown configurable parameter is rejected while parsing...
    with pytest.raises(ValueError, match="fdsp"):
        gin.parse_config("make_mesh.fdsp = 2")
    # ...and a misspelt model field as soon as the config is built, naming the field.
    from rlaif_jax.models import custom_model_config

    gin.parse_config("custom_model_config.hiden_size = 64")
    with pytest.raises(TypeError, match="hiden_size"):
        custom_model_config()
