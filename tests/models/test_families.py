"""Llama 3.x, Qwen2.5, Qwen3, Gemma 2 and Gemma 3 (text) against transformers' PyTorch models
built from small random configs of each family (hf_fixtures.MODERN, no download): logits on
packed and padded rows (past the sliding window where the family has one), greedy decoding
through the KV cache against HF generate, and export -> HF load -> the same logits. One HF
model per family, shared by the family's tests."""

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
import transformers  # noqa: E402

from rlaif_jax.errors import ConfigError  # noqa: E402
from rlaif_jax.models import DecoderConfig, apply, build_model  # noqa: E402
from rlaif_jax.models.hf_io import load_hf, save_hf  # noqa: E402
from rlaif_jax.sampling import SamplingParams, generate  # noqa: E402
from tests.models.hf_fixtures import MODERN, make_hf_model, random_ids, save_hf_model  # noqa: E402

HF_CLASS = {
    "llama3_2": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "gemma3": "Gemma3ForCausalLM",
}


@pytest.fixture(scope="module", params=MODERN)
def family(request, tmp_path_factory):
    name = request.param
    path = tmp_path_factory.mktemp(name)
    hf = make_hf_model(name)
    save_hf_model(hf, path)
    cfg, params = load_hf(str(path))
    model = build_model(cfg)
    forward = jax.jit(lambda p, t, pos, seg: apply(model, p, t, pos, seg)["logits"])
    return name, hf, path, cfg, model, params, forward


def _hf_logits(hf, ids, mask=None):
    with torch.no_grad():
        kw = {} if mask is None else {"attention_mask": torch.tensor(mask)}
        return hf(torch.tensor(ids, dtype=torch.long), **kw).logits.float().numpy()


def test_config_reads_the_family(family):
    name, hf, _, cfg, *_ = family
    assert cfg.model_type == hf.config.model_type
    if name.startswith("gemma"):
        assert cfg.is_gemma and cfg.hidden_act == "gelu_pytorch_tanh" and cfg.local_layers is not None
        assert cfg.query_pre_attn_scalar == hf.config.query_pre_attn_scalar
    if name == "gemma2":
        assert (cfg.attn_logit_softcap, cfg.final_logit_softcap) == (3.0, 2.0)
        assert cfg.local_layers == (True, False, True) and cfg.rope_local_theta is None
    if name == "gemma3":
        assert cfg.rope_local_theta == 1e4 and cfg.rope_theta == 1e6 and cfg.rope_type == "linear"
        assert cfg.local_layers == (True, True, False) and cfg.attn_logit_softcap is None
    assert cfg.qk_norm == (name in ("qwen3", "gemma3"))
    assert cfg.qkv_bias == (name == "qwen2") and not cfg.attention_bias


def test_packed_and_padded_logits_match_hf(family):
    """Three sequences (7, 9 and 4 tokens; window 5) packed in one row with padding, and a
    right-padded batch: each real position's logits equal HF's on the sequence alone."""
    _, hf, _, _, _, params, forward = family
    seqs = [random_ids(1, n, seed)[0] for n, seed in ((7, 1), (9, 2), (4, 3))]
    T = 24
    tokens, pos, segs = (np.zeros((2, T), np.int32) for _ in range(3))
    off = 0
    for i, s in enumerate(seqs):
        tokens[0, off : off + len(s)], segs[0, off : off + len(s)] = s, i + 1
        pos[0, off : off + len(s)] = np.arange(len(s))
        off += len(s)
    long = random_ids(1, 14, 4)[0]  # row 2: one sequence, right-padded
    tokens[1, :14], segs[1, :14], pos[1, :14] = long, 1, np.arange(14)
    ours = np.asarray(forward(params, tokens, pos, segs))
    off = 0
    for s in seqs:
        np.testing.assert_allclose(ours[0, off : off + len(s)], _hf_logits(hf, s[None])[0], atol=1e-4, rtol=1e-4)
        off += len(s)
    np.testing.assert_allclose(ours[1, :14], _hf_logits(hf, long[None])[0], atol=1e-4, rtol=1e-4)


# The decode path's family features are Gemma 2's (per-layer windows over a full cache, caps in
# the cached kernels); the others' (and Gemma 3's two RoPE bases, shared with the forward) are
# checked by the forward above, and each sampler compile costs ~5 s of CPU: -m slow runs them.
DECODE_DEFAULT = ("gemma2",)


@pytest.mark.parametrize(
    "family",
    [n if n in DECODE_DEFAULT else pytest.param(n, marks=pytest.mark.slow) for n in MODERN],
    indirect=True,
)
def test_greedy_decoding_equals_hf_generate(family):
    """Prompts longer than the window, 8 new tokens through the KV cache."""
    _, hf, _, _, model, params, _ = family
    prompts = [[1] + list(random_ids(1, 7, 5)[0]), [1, 9, 4]]
    out = generate(model, params, prompts, jax.random.key(0), SamplingParams(max_new_tokens=8, temperature=0.0))
    for i, p in enumerate(prompts):
        with torch.no_grad():
            ref = hf.generate(
                torch.tensor([p]),
                max_new_tokens=8,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=0,
                attention_mask=torch.ones(1, len(p), dtype=torch.long),
            )[0, len(p) :].numpy()
        np.testing.assert_array_equal(out.tokens[i], ref)


def test_export_loads_in_transformers_with_the_same_logits(family, tmp_path):
    name, hf, _, cfg, _, params, _ = family
    save_hf(str(tmp_path), cfg, params)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
    assert type(reloaded).__name__ == HF_CLASS[name]
    ids = random_ids(2, 12, 6)
    np.testing.assert_array_equal(_hf_logits(reloaded, ids), _hf_logits(hf, ids))
    assert DecoderConfig.from_pretrained(str(tmp_path)) == cfg


# Each variant drops or changes one family feature: the parity above can fail.
VARIANTS = {
    "gemma2": [
        dict(attn_logit_softcap=None),
        dict(final_logit_softcap=None),
        dict(layer_types=("full_attention",) * 3),
        dict(query_pre_attn_scalar=None),
        dict(hidden_act="silu"),
    ],
    "gemma3": [
        dict(rope_local_theta=1e6),
        dict(layer_types=("sliding_attention", "full_attention", "sliding_attention")),
        dict(model_type="gemma2"),  # no q/k norms
    ],
    "qwen3": [dict(model_type="llama")],  # no q/k norms
    "llama3_2": [dict(rope_scaling=None)],
}


@pytest.mark.slow
def test_each_family_feature_changes_the_logits(family):
    name, hf, _, cfg, _, params, _ = family
    ids = random_ids(1, 14, 7)
    ref = _hf_logits(hf, ids)
    for change in VARIANTS.get(name, ()):
        variant = cfg.replace(**change)
        p = params
        if change.get("model_type") in ("gemma2", "llama"):  # the q/k norm params go unused
            p = {**params, "layers": {**params["layers"], "attn": dict(params["layers"]["attn"])}}
            for n in ("q_norm", "k_norm"):
                p["layers"]["attn"].pop(n)
        out = np.asarray(apply(build_model(variant), p, ids)["logits"])
        assert np.abs(out - ref).max() > 1e-2, change


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("hidden_act", "gelu", "hidden_act = 'gelu' is not implemented"),
        ("rope_parameters", {"rope_type": "longrope", "rope_theta": 1e4}, "rope_parameters.rope_type"),
        ("model_type", "gemma3", "no text_config"),
        ("model_type", "phi3", "model_type 'phi3' is not supported"),
        ("use_bidirectional_attention", True, "use_bidirectional_attention"),
        ("layer_types", ["chunked_attention"] * 2, "layer_types"),
    ],
)
def test_unimplemented_hf_fields_are_named(field, value, match):
    d = transformers.Qwen3Config(num_hidden_layers=2, sliding_window=4).to_dict()
    d[field] = value
    with pytest.raises(ConfigError, match=match):
        DecoderConfig.from_hf(d)


def test_gemma_hidden_activation_field_is_named():
    d = transformers.Gemma2Config(num_hidden_layers=2).to_dict()
    d["hidden_activation"] = "relu"
    with pytest.raises(ConfigError, match="hidden_activation = 'relu'"):
        DecoderConfig.from_hf(d)


@pytest.mark.slow  # ~3 s of CPU; the per-layer windows are Gemma 2's mechanism, checked above
def test_qwen2_sliding_window_layers_match_hf(tmp_path):
    """A Qwen2 checkpoint with use_sliding_window (layers from max_window_layers on slide)."""
    hf = make_hf_model("qwen2", use_sliding_window=True, sliding_window=5, max_window_layers=1)
    save_hf_model(hf, tmp_path)
    cfg, params = load_hf(str(tmp_path))
    assert cfg.layer_types == ("full_attention", "sliding_attention", "sliding_attention")
    ids = random_ids(2, 14, 8)
    ours = np.asarray(apply(build_model(cfg), params, ids)["logits"])
    np.testing.assert_allclose(ours, _hf_logits(hf, ids), atol=1e-4, rtol=1e-4)
