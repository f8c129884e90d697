"""The text tower of a multimodal Gemma 3 checkpoint (Gemma3ForConditionalGeneration,
model_type 'gemma3': gemma-3-4b / 12b / 27b) loads as our text decoder: a tiny random one built
here (no hub), saved with save_pretrained, loaded by load_hf (config from text_config, weights
from the language_model prefix, the vision tower dropped) gives HF's text-only logits, and
exports as a text-only Gemma3ForCausalLM checkpoint that transformers loads with the same
logits."""

import json
import logging
import os

import gin
import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
import transformers  # noqa: E402
from safetensors.numpy import load_file, save_file  # noqa: E402

from rlaif_jax.errors import ConfigError  # noqa: E402
from rlaif_jax.models import DecoderConfig, apply, build_model  # noqa: E402
from rlaif_jax.models.hf_io import load_hf, save_hf  # noqa: E402

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "..", "configs")
VOCAB = 97
IMAGE_TOKENS = (94, 95, 96)  # boi, eoi, image: kept out of the test ids (text-only inputs)


def _multimodal(seed=0):
    text = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        query_pre_attn_scalar=16,
        sliding_window=5,
        max_position_embeddings=64,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"],
        rope_parameters={
            "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6},
            "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
        },
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    vision = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=14
    )
    cfg = transformers.Gemma3Config(
        text_config=text,
        vision_config=vision,
        mm_tokens_per_image=4,
        boi_token_index=IMAGE_TOKENS[0],
        eoi_token_index=IMAGE_TOKENS[1],
        image_token_index=IMAGE_TOKENS[2],
        eos_token_id=[2, 93],  # the wrapper's ids win, as gemma-3-4b-it's eos [1, 106]
    )
    torch.manual_seed(seed)
    model = transformers.Gemma3ForConditionalGeneration(cfg).eval()
    # Larger weights and random norm weights: every detail of the text tower changes the logits.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1 and p.shape[0] > 1:
                p.mul_(4.0)
            else:
                p.add_(0.2 * torch.randn_like(p))
    return model


def _ids(batch, length, seed=0):
    return np.random.RandomState(seed).randint(3, IMAGE_TOKENS[0], (batch, length)).astype(np.int32)


def _hf_logits(model, ids):
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids, dtype=torch.long)).logits.float().numpy()


@pytest.fixture(scope="module")
def multimodal(tmp_path_factory):
    path = tmp_path_factory.mktemp("gemma3_mm")
    hf = _multimodal()
    hf.save_pretrained(path, safe_serialization=True)
    return hf, str(path)


def test_text_tower_logits_match_hf(multimodal, caplog):
    hf, path = multimodal
    stored = load_file(os.path.join(path, "model.safetensors"))
    assert "language_model.model.embed_tokens.weight" in stored  # transformers 5.24's naming
    vision = [k for k in stored if not k.startswith("language_model.")]
    assert vision and all(k.startswith(("vision_tower.", "multi_modal_projector.")) for k in vision)
    with caplog.at_level(logging.INFO, logger="rlaif_jax.models.hf_io"):
        cfg, params = load_hf(path)
    lines = [r for r in caplog.records if r.name == "rlaif_jax.models.hf_io"]
    assert len(lines) == 1 and lines[0].levelno == logging.INFO, [r.getMessage() for r in lines]
    assert f"dropping {len(vision)} tensor(s) of the vision tower" in lines[0].getMessage()
    assert cfg.model_type == "gemma3_text" and cfg.local_layers == (True, True, False)
    assert (cfg.rope_theta, cfg.rope_local_theta, cfg.rope_type) == (1e6, 1e4, "linear")
    assert cfg.eos_token_ids == (2, 93)
    ids = _ids(2, 14)  # past the window of 5
    ours = np.asarray(jax.jit(lambda p, t: apply(build_model(cfg), p, t)["logits"])(params, ids))
    np.testing.assert_allclose(ours, _hf_logits(hf, ids), atol=1e-4, rtol=1e-4)


def test_export_is_a_text_only_gemma3_for_causal_lm(multimodal, tmp_path):
    hf, path = multimodal
    cfg, params = load_hf(path)
    save_hf(str(tmp_path), cfg, params)
    with open(tmp_path / "config.json") as f:
        written = json.load(f)
    assert written["architectures"] == ["Gemma3ForCausalLM"] and written["model_type"] == "gemma3_text"
    assert all(k.startswith("model.") for k in load_file(str(tmp_path / "model.safetensors")))
    back = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
    assert type(back).__name__ == "Gemma3ForCausalLM"
    ids = _ids(1, 12, seed=1)
    np.testing.assert_allclose(_hf_logits(back, ids), _hf_logits(hf, ids), atol=1e-4, rtol=1e-4)


def test_in_memory_naming_loads_the_same(multimodal, tmp_path):
    """A checkpoint saved with transformers' in-memory names (model.language_model.*,
    lm_head.weight) gives the same params."""
    _, path = multimodal
    stored = load_file(os.path.join(path, "model.safetensors"))
    renamed = {
        (
            "model.language_model." + k[len("language_model.model.") :]
            if k.startswith("language_model.model.")
            else "model." + k
        ): v
        for k, v in stored.items()
    }
    save_file(renamed, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(path, "config.json")) as f:
        (tmp_path / "config.json").write_text(f.read())
    _, a = load_hf(path)
    _, b = load_hf(str(tmp_path))
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


# google/gemma-3-4b-it's and -12b-it's config.json text_config (the fields the hub files set;
# transformers fills the rest from Gemma3TextConfig's defaults).
PUBLISHED_TEXT_CONFIGS = {
    "gemma3_4b": dict(hidden_size=2560, intermediate_size=10240, num_hidden_layers=34),
    "gemma3_12b": dict(
        hidden_size=3840, intermediate_size=15360, num_hidden_layers=48, num_attention_heads=16, num_key_value_heads=8
    ),
}


@pytest.mark.usefixtures("clean_gin")
@pytest.mark.parametrize("name", sorted(PUBLISHED_TEXT_CONFIGS))
def test_model_files_match_the_published_text_config(name):
    text = dict(
        PUBLISHED_TEXT_CONFIGS[name],
        model_type="gemma3_text",
        rope_scaling={"factor": 8.0, "rope_type": "linear"},
        sliding_window=1024,
    )
    hub = {"architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3", "text_config": text}
    from rlaif_jax.models import custom_model_config

    gin.clear_config()
    gin.parse_config_files_and_bindings([os.path.join(CONFIGS, "models", f"{name}.gin")], [])
    ours = custom_model_config()
    numerics = {k: getattr(ours, k) for k in ("dtype", "param_dtype", "remat_policy", "vocab_chunk_size")}
    assert DecoderConfig.from_hf(hub, **numerics) == ours
    assert DecoderConfig.from_hf(transformers.AutoConfig.for_model(**hub), **numerics) == ours


def test_a_gemma3_config_without_text_config_is_refused():
    with pytest.raises(ConfigError, match="no text_config"):
        DecoderConfig.from_hf({"model_type": "gemma3", "architectures": ["Gemma3ForConditionalGeneration"]})
