"""Model and mesh gin files parse, build, and reject typos."""

import os

import flax.linen as nn
import gin
import jax
import pytest

from rlaif_jax import sharding as shd
from rlaif_jax.models import DecoderConfig, build_model, init_params
from rlaif_jax.models.params import abstract_params

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


# The issue-36 model files and their published parameter counts (model cards / safetensors
# totals, tied embeddings counted once).
MODERN_FILES = {
    "llama3_1_8b": 8_030_261_248,
    "llama3_1_70b": 70_553_706_496,
    "llama3_2_1b": 1_235_814_400,
    "llama3_2_3b": 3_212_749_824,
    "qwen2_5_1_5b": 1_543_714_304,
    "qwen2_5_7b": 7_615_616_512,
    "qwen2_5_32b": 32_763_876_352,
    "qwen3_1_7b": None,  # the card says 1.7B (1.4B without embeddings): no exact total
    "qwen3_8b": 8_190_735_360,
    "gemma2_2b": 2_614_341_888,
    "gemma2_9b": 9_241_705_984,
    "gemma2_27b": 27_227_128_320,
    "gemma3_270m": 268_098_176,
    "gemma3_1b": 999_885_952,
    # Text towers of multimodal checkpoints: the cards' 4.3B / 12.2B count the vision tower too.
    "gemma3_4b": None,
    "gemma3_12b": None,
}


def test_modern_model_files_match_transformers_and_the_published_sizes():
    """Each file's config: transformers builds the same architecture from its to_hf() (on the
    meta device: no memory), with our parameter count and the published one, and from_hf of
    that gives the config back."""
    torch = pytest.importorskip("torch")
    import transformers

    from rlaif_jax.models import custom_model_config

    for name, published in MODERN_FILES.items():
        gin.clear_config()
        gin.parse_config_files_and_bindings([os.path.join(CONFIGS, "models", f"{name}.gin")], [])
        cfg = custom_model_config()
        assert published is None or cfg.num_params() == published, name
        with torch.device("meta"):
            hf = transformers.AutoModelForCausalLM.from_config(cfg.to_hf())
        assert sum(p.numel() for p in hf.parameters()) == cfg.num_params(), name
        numerics = {k: getattr(cfg, k) for k in ("dtype", "param_dtype", "remat_policy", "vocab_chunk_size")}
        assert DecoderConfig.from_hf(hf.config, **numerics) == cfg, name
        if name in ("gemma2_9b", "gemma3_1b", "qwen2_5_7b", "qwen3_8b"):  # our decoder holds exactly those
            abstract = jax.tree.leaves(nn.unbox(abstract_params(build_model(cfg))))
            assert sum(x.size for x in abstract) == cfg.num_params(), name
