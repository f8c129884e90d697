"""Our decoder against the HF transformers PyTorch implementation, on tiny random models of
every family and rope variant, plus the HF -> ours -> HF round trip."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
import transformers  # noqa: E402
from safetensors.numpy import load_file  # noqa: E402

from rlaif_jax.errors import WeightsError  # noqa: E402
from rlaif_jax.models import DecoderConfig, apply, build_model  # noqa: E402
from rlaif_jax.models.hf_io import load_hf, save_hf  # noqa: E402
from tests.models.hf_fixtures import FAMILIES, MODERN, make_hf_model, random_ids, save_hf_model  # noqa: E402


def _hf_logits(model, ids, attention_mask=None):
    with torch.no_grad():
        kw = {} if attention_mask is None else {"attention_mask": torch.tensor(attention_mask)}
        return model(torch.tensor(ids, dtype=torch.long), **kw).logits.float().numpy()


@pytest.mark.parametrize("family", sorted(set(FAMILIES) - set(MODERN)))  # MODERN: test_families.py
def test_logits_match_hf(family, tmp_path):
    hf = make_hf_model(family)
    save_hf_model(hf, tmp_path)
    cfg, params = load_hf(str(tmp_path))
    # Longer than the sliding window, and past max_position_embeddings for dynamic NTK.
    ids = random_ids(2, 14)
    ours = np.asarray(jax.jit(lambda p, t: apply(build_model(cfg), p, t)["logits"])(params, ids))
    ref = _hf_logits(hf, ids)
    np.testing.assert_allclose(ours, ref, atol=2e-4, rtol=1e-4)


def test_parity_tests_are_sensitive(tmp_path):
    """The window, the rope type and theta each change logits: the parity above can fail."""
    hf = make_hf_model("mistral_window")
    save_hf_model(hf, tmp_path)
    cfg, params = load_hf(str(tmp_path))
    ids = random_ids(1, 14)
    ref = _hf_logits(hf, ids)
    for variant in (
        cfg.replace(sliding_window=None),
        cfg.replace(rope_theta=5e6),
        cfg.replace(rope_scaling={"rope_type": "linear", "factor": 2.0}),
    ):
        out = np.asarray(apply(build_model(variant), params, ids)["logits"])
        assert np.abs(out - ref).max() > 1e-2


def test_config_from_hf_fields(tmp_path):
    hf = make_hf_model("rope_llama3")
    save_hf_model(hf, tmp_path)
    cfg = DecoderConfig.from_pretrained(str(tmp_path))
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.num_layers) == (4, 1, 16, 3)
    assert cfg.rope_type == "llama3" and cfg.rope_theta == 5e5
    assert cfg.rope_scaling_dict["original_max_position_embeddings"] == 8
    # Legacy (transformers 4.x) config.json spelling: rope_theta + rope_scaling with "type".
    legacy = json.loads((tmp_path / "config.json").read_text())
    legacy.pop("rope_parameters", None)
    legacy.update(rope_theta=123.0, rope_scaling={"type": "linear", "factor": 3.0})
    (tmp_path / "config.json").write_text(json.dumps(legacy))
    cfg = DecoderConfig.from_pretrained(str(tmp_path))
    assert cfg.rope_theta == 123.0 and cfg.rope_type == "linear" and cfg.rope_scaling_dict["factor"] == 3.0


def test_unsupported_config_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="rope type"):
        DecoderConfig(
            vocab_size=8,
            hidden_size=8,
            intermediate_size=8,
            num_layers=1,
            num_heads=2,
            num_kv_heads=2,
            rope_scaling={"rope_type": "longrope"},
        )
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        DecoderConfig(
            vocab_size=8, hidden_size=8, intermediate_size=8, num_layers=1, num_heads=3, num_kv_heads=2, head_dim=4
        )
    with pytest.raises(FileNotFoundError, match="config.json"):
        DecoderConfig.from_pretrained(str(tmp_path))


@pytest.mark.parametrize("scan_layers", [True, False])
def test_round_trip_is_exact(tmp_path, scan_layers):
    """HF -> ours -> HF gives bit-identical tensors and a config transformers loads, from a
    sharded checkpoint (index json) and with biases."""
    hf = make_hf_model("biases")
    src = save_hf_model(hf, tmp_path / "src", max_shard_size="50KB")
    assert os.path.exists(os.path.join(src, "model.safetensors.index.json"))
    cfg, params = load_hf(str(src), scan_layers=scan_layers)
    save_hf(str(tmp_path / "dst"), cfg, params, max_shard_bytes=60_000)
    dst = tmp_path / "dst"
    assert (dst / "model.safetensors.index.json").exists()

    def tensors(d):
        out = {}
        for f in sorted(os.listdir(d)):
            if f.endswith(".safetensors"):
                out.update(load_file(os.path.join(d, f)))
        return out

    a, b = tensors(src), tensors(dst)
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert np.array_equal(a[k], b[k]), k
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(dst)).eval()
    ids = random_ids(2, 9)
    np.testing.assert_array_equal(_hf_logits(reloaded, ids), _hf_logits(hf, ids))


def test_bf16_round_trip_and_forward(tmp_path):
    hf = make_hf_model("llama2_gqa").to(torch.bfloat16)
    save_hf_model(hf, tmp_path / "src")
    cfg, params = load_hf(str(tmp_path / "src"), dtype="bfloat16", param_dtype="bfloat16")
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(params))
    save_hf(str(tmp_path / "dst"), cfg, params)
    a = load_file(str(tmp_path / "src" / "model.safetensors"))
    b = load_file(str(tmp_path / "dst" / "model.safetensors"))
    assert all(np.array_equal(a[k], b[k]) for k in a)
    ids = random_ids(2, 10)
    ours = np.asarray(apply(build_model(cfg), params, ids)["logits"])
    ref = _hf_logits(hf, ids)
    # bf16 end to end in both: agreement to bf16 precision of the logits' scale.
    assert np.abs(ours - ref).max() < 0.05 * np.abs(ref).max()
    assert (ours.argmax(-1) == ref.argmax(-1)).mean() > 0.9


def test_missing_and_misshapen_tensors_are_named(tmp_path):
    hf = make_hf_model("llama1")
    save_hf_model(hf, tmp_path)
    cfg = DecoderConfig.from_pretrained(str(tmp_path))
    with pytest.raises(ValueError, match=r"model.embed_tokens.weight.*shape"):
        load_hf(str(tmp_path), config=cfg.replace(vocab_size=98))
    with pytest.raises(WeightsError, match="lacks"):
        load_hf(str(tmp_path), config=cfg.replace(num_layers=4))
    with pytest.raises(WeightsError, match="safetensors"):
        load_hf(str(tmp_path / "nowhere"), config=cfg)


@pytest.mark.parametrize("family", ["mistral_window", "mixtral"])  # the window; per-token expert routing
def test_padding_and_packing_match_separate_sequences(tmp_path, family):
    hf = make_hf_model(family)
    save_hf_model(hf, tmp_path)
    cfg, params = load_hf(str(tmp_path))
    model = build_model(cfg)
    a, b, c = random_ids(1, 7, 1)[0], random_ids(1, 9, 2)[0], random_ids(1, 4, 3)[0]
    alone = [np.asarray(apply(model, params, s[None])["logits"])[0] for s in (a, b, c)]
    # Packed: a, b, c in one row of 24 with segments 1, 2, 3 and 4 padding slots.
    T = 24
    tokens = np.zeros((1, T), np.int32)
    segs = np.zeros((1, T), np.int32)
    pos = np.zeros((1, T), np.int32)
    off = 0
    for i, s in enumerate((a, b, c)):
        tokens[0, off : off + len(s)] = s
        segs[0, off : off + len(s)] = i + 1
        pos[0, off : off + len(s)] = np.arange(len(s))
        off += len(s)
    packed = np.asarray(apply(model, params, tokens, pos, segs)["logits"])[0]
    off = 0
    for s, ref in zip((a, b, c), alone):
        np.testing.assert_allclose(packed[off : off + len(s)], ref, atol=1e-5)
        off += len(s)
    # Right-padded batch vs HF with an attention mask.
    ids = np.zeros((2, 9), np.int32)
    ids[0, :7], ids[1] = a, b
    mask = (np.arange(9)[None] < np.array([[7], [9]])).astype(np.int32)
    ours = np.asarray(apply(model, params, ids, None, mask)["logits"])
    np.testing.assert_allclose(ours[0, :7], alone[0], atol=1e-5)
    np.testing.assert_allclose(ours[1], _hf_logits(hf, ids[1:])[0], atol=2e-4)


def test_remat_and_unscanned_layers_do_not_change_numbers(tmp_path):
    hf = make_hf_model("llama2_gqa")
    save_hf_model(hf, tmp_path)
    ids = random_ids(2, 8)
    results = {}
    for scan in (True, False):
        for remat in ("none", "full", "dots"):
            cfg, params = load_hf(str(tmp_path), scan_layers=scan, remat_policy=remat)
            model = build_model(cfg)

            def loss(p):
                return jnp.mean(apply(model, p, ids)["logits"] ** 2)

            val, grads = jax.jit(jax.value_and_grad(loss))(params)
            g = grads["embed"]["embedding"]
            results[(scan, remat)] = (float(val), np.asarray(g))
    base_val, base_g = results[(True, "none")]
    for key, (val, g) in results.items():
        assert abs(val - base_val) < 1e-5 * abs(base_val), key
        np.testing.assert_allclose(g, base_g, atol=1e-6, rtol=1e-4, err_msg=str(key))


def test_scalar_heads_and_score_export(tmp_path):
    hf = make_hf_model("llama1")
    save_hf_model(hf, tmp_path / "src")
    cfg, params = load_hf(str(tmp_path / "src"))
    model = build_model(cfg, lm_head=False, scalar_heads=("score",))
    from rlaif_jax.models import gather_last, init_params

    head = init_params(model, jax.random.key(0))["score_head"]
    params = {k: v for k, v in params.items() if k != "lm_head"}
    params["score_head"] = head
    ids = random_ids(2, 6)
    segs = np.array([[1] * 6, [1] * 4 + [0] * 2], np.int32)
    out = apply(model, params, ids, None, segs)
    assert "logits" not in out and out["score"].shape == (2, 6)
    reward = np.asarray(gather_last(out["score"], segs))
    save_hf(str(tmp_path / "rm"), cfg, params, score_head=True)
    rm = transformers.AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "rm")).eval()
    with torch.no_grad():
        ref = rm(torch.tensor(ids[:1])).logits[0, 0].item()
    assert abs(reward[0] - ref) < 1e-4
    # The row's last real token decides its reward, not the padding after it.
    assert abs(reward[1] - np.asarray(out["score"])[1, 3]) < 1e-7
