"""DecoderConfig.attention_impl: every kernel that runs on CPU against the einsum reference
(logits and gradients) on packed rows with GQA, with and without a sliding window; 'auto'
on CPU is the einsum path bit for bit; the GPU/TPU-only choices fail with a clear error."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlaif_jax.errors import ConfigError
from rlaif_jax.models import DecoderConfig, apply, build_model, decoder, init_cache, init_params


def _cfg(**kw):
    base = dict(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_layers=1,
        num_heads=4,
        num_kv_heads=2,
        head_dim=8,
        model_type="mistral",
        attention_impl="einsum",
    )
    return DecoderConfig(**{**base, **kw})


def _packed(T: int, seed: int = 0):
    """Two rows of two segments each (positions restart per segment); the second row ends in
    padding (segment 0)."""
    a, b = T // 2 + 1, T - T // 4
    seg = np.zeros((2, T), np.int32)
    seg[0, :a], seg[0, a:] = 1, 2
    seg[1, : T // 3], seg[1, T // 3 : b] = 1, 2
    pos = np.zeros((2, T), np.int32)
    for r in range(2):
        for s in (1, 2):
            idx = np.nonzero(seg[r] == s)[0]
            pos[r, idx] = np.arange(len(idx))
    tokens = np.asarray(jax.random.randint(jax.random.key(seed), (2, T), 0, 64), np.int32)
    return jnp.asarray(tokens), jnp.asarray(pos), jnp.asarray(seg)


def _logits_and_grads(cfg, params, tokens, pos, seg):
    model = build_model(cfg)
    real = (seg != 0)[..., None]
    w = jax.random.normal(jax.random.key(1), tokens.shape + (cfg.vocab_size,))

    def loss(p):
        logits = apply(model, p, tokens, pos, seg)["logits"]
        return jnp.sum(jnp.where(real, logits * w, 0.0)), logits

    (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    return np.asarray(logits), grads


@functools.lru_cache(maxsize=None)
def _reference(window, T):
    """Params, and the einsum path's logits and gradients, on `_packed(T)` (compiled once)."""
    cfg = _cfg(sliding_window=window)
    params = init_params(build_model(cfg), jax.random.key(0))
    return (params,) + _logits_and_grads(cfg, params, *_packed(T))


def _compare(cfg, T):
    tokens, pos, seg = _packed(T)
    params, ref_l, ref_g = _reference(cfg.sliding_window, T)
    out_l, out_g = _logits_and_grads(cfg, params, tokens, pos, seg)
    real = np.asarray(seg != 0)
    # Outputs at padding queries are never used (the kernels may mask them differently).
    np.testing.assert_allclose(out_l[real], ref_l[real], atol=1e-5, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(out_g), jax.tree.leaves(ref_g)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-4)
    return out_l, ref_l, real


@pytest.mark.parametrize("window", [pytest.param(None, marks=pytest.mark.slow), 5])  # the window case masks more
def test_xla_matches_einsum(window):
    out, ref, _ = _compare(_cfg(sliding_window=window, attention_impl="xla"), 16)
    np.testing.assert_allclose(out, ref, atol=1e-5, rtol=1e-5)  # padding rows too: same mask


@pytest.mark.parametrize("window", [pytest.param(None, marks=pytest.mark.slow), 5])  # the window case masks more
def test_cudnn_masking_matches_einsum(window, monkeypatch):
    """What 'cudnn' passes to jax.nn.dot_product_attention (index causal + left window +
    the segment mask), run with the XLA implementation: cuDNN itself needs a GPU."""
    monkeypatch.setattr(
        decoder,
        "fused_attention",
        lambda impl, q, k, v, pos, seg, w, layout=None, **kw: decoder._index_masked_sdpa(
            q, k, v, seg, w, "xla", kw.get("scale")
        ),
    )
    _compare(_cfg(sliding_window=window, attention_impl="xla"), 16)


@pytest.mark.parametrize("window", [pytest.param(None, marks=pytest.mark.slow), 40])
def test_splash_interpret_matches_einsum(window, monkeypatch):
    """The Pallas TPU splash kernel in interpret mode on CPU (blocks of 128 tokens)."""
    monkeypatch.setattr(decoder, "SPLASH_INTERPRET", True)
    _compare(_cfg(sliding_window=window, attention_impl="splash"), 128)


def test_splash_off_tpu_is_a_clear_error():
    if jax.default_backend() == "tpu":
        pytest.skip("on a TPU splash runs")
    cfg = _cfg(attention_impl="splash", num_layers=1)
    tokens, pos, seg = _packed(128)
    params = _reference(5, 16)[0]  # the window does not change the params (shared with other tests)
    init_params(build_model(cfg), jax.random.key(0))  # the 4-token init runs einsum
    with pytest.raises(ConfigError, match=r"DecoderConfig.attention_impl = 'splash' needs a TPU"):
        apply(build_model(cfg), params, tokens, pos, seg)


def test_auto_on_cpu_is_todays_path_bit_for_bit():
    if jax.default_backend() != "cpu":
        pytest.skip("'auto' picks a fused kernel on accelerators")
    auto = _cfg(attention_impl="auto", sliding_window=5)
    assert decoder.resolve_attention_impl(auto, 16) == "einsum"
    params, r_l, r_g = _reference(5, 16)
    a_l, a_g = _logits_and_grads(auto, params, *_packed(16))
    np.testing.assert_array_equal(a_l, r_l)
    for a, b in zip(jax.tree.leaves(a_g), jax.tree.leaves(r_g)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_decoding_with_a_cache_uses_einsum():
    cfg, ref = _cfg(attention_impl="xla", sliding_window=5), _cfg(sliding_window=5)
    tokens, pos, seg = _packed(16)
    params = _reference(5, 16)[0]

    def run(c):
        out = apply(
            build_model(c), params, tokens, pos, seg, cache=init_cache(c, 2, 16), cache_index=jnp.zeros((), jnp.int32)
        )
        return np.asarray(out["logits"])

    np.testing.assert_array_equal(run(cfg), run(ref))


def test_cudnn_needs_half_precision():
    with pytest.raises(ConfigError, match=r"DecoderConfig.attention_impl = 'cudnn' needs dtype bfloat16"):
        _cfg(attention_impl="cudnn")


def test_cudnn_off_nvidia_gpu_is_a_clear_error():
    if decoder._is_cuda():
        pytest.skip("on an NVIDIA GPU cudnn runs")
    cfg = _cfg(attention_impl="cudnn", dtype="bfloat16")
    tokens, pos, seg = _packed(16)
    params = _reference(None, 16)[0]
    with pytest.raises(ConfigError, match=r"DecoderConfig.attention_impl = 'cudnn' needs an NVIDIA GPU"):
        apply(build_model(cfg), params, tokens, pos, seg)


def test_unknown_impl_names_the_setting():
    with pytest.raises(ConfigError, match=r"DecoderConfig.attention_impl = 'flash': must be one of"):
        _cfg(attention_impl="flash")


def test_not_written_to_hf_config(tmp_path):
    pytest.importorskip("transformers")
    cfg = _cfg(attention_impl="xla", sliding_window=5)
    d = cfg.to_hf().to_dict()
    assert "attention_impl" not in d
    cfg.to_hf().save_pretrained(tmp_path)
    assert "attention_impl" not in (tmp_path / "config.json").read_text()
    back = DecoderConfig.from_pretrained(str(tmp_path), attention_impl="xla")
    assert back.attention_impl == "xla" and back.sliding_window == 5
    assert DecoderConfig.from_pretrained(str(tmp_path)).attention_impl == "auto"


def test_splash_under_a_mesh(monkeypatch):
    """Under a (data, tensor) mesh the kernel runs on each device's rows (shard_map)."""
    if jax.device_count() < 4:
        pytest.skip("needs 4 devices (tests/conftest.py gives 8 CPU devices)")
    from rlaif_jax import sharding as shd

    monkeypatch.setattr(decoder, "SPLASH_INTERPRET", True)
    mesh = shd.make_mesh(data=2, fsdp=1, tensor=2, devices=jax.devices()[:4])
    tokens, pos, seg = _packed(128)
    params, ref, _ = _reference(40, 128)
    cfg = _cfg(sliding_window=40, attention_impl="splash")
    model = build_model(cfg, layout=shd.Layout(mesh, shd.logical_rules()))
    out = jax.jit(lambda p: apply(model, p, tokens, pos, seg)["logits"])(params)
    real = np.asarray(seg != 0)
    np.testing.assert_allclose(np.asarray(out)[real], ref[real], atol=1e-5, rtol=1e-5)


def test_auto_follows_the_layouts_devices_not_the_default_backend():
    """A model laid out on a TPU topology's devices (compiled ahead of time from a CPU host)
    picks splash for 'auto'; on CPU devices, or without a layout, the default backend's
    choice (einsum here) stands."""
    from rlaif_jax import sharding as shd

    auto = _cfg(attention_impl="auto")
    cpu = shd.Layout(shd.make_mesh(1, 1, 1, devices=jax.devices("cpu")[:1]), shd.logical_rules())
    assert decoder.platform(cpu) == "cpu" and decoder.resolve_attention_impl(auto, 128, cpu) == "einsum"
    if jax.default_backend() == "cpu":
        assert decoder.resolve_attention_impl(auto, 128) == "einsum"
    pytest.importorskip("libtpu", reason="libtpu is not installed: a TPU topology's devices need it (.[tpu-aot])")
    import os

    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax.experimental import topologies

    devices = topologies.get_topology_desc(topology_name="v5e:2x2", platform="tpu").devices
    tpu = shd.Layout(shd.make_mesh(1, -1, 1, devices=devices), shd.logical_rules())
    assert decoder.platform(tpu) == "tpu"
    assert decoder.resolve_attention_impl(auto, 128, tpu) == "splash"
    assert decoder.resolve_attention_impl(auto, 16, tpu) == "einsum"  # not a multiple of 128
