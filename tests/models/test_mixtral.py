"""Mixtral (sparse mixture of experts) against HF transformers' MixtralForCausalLM on a tiny
random model (4 experts, top-2, GQA): logits for both expert implementations, routing
sensitivity, the load-balancing loss, greedy generation, HF round trips (hub and fused
layouts), packing, remat / scan / bf16, sharded runs, and the objectives' aux-loss wiring."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

torch = pytest.importorskip("torch")
import transformers  # noqa: E402
from safetensors.numpy import load_file, save_file  # noqa: E402

from rlaif_jax import sharding as shd  # noqa: E402
from rlaif_jax.models import DecoderConfig, apply, build_model, decoder, init_params  # noqa: E402
from rlaif_jax.models.hf_io import load_hf, save_hf  # noqa: E402
from rlaif_jax.sampling import SamplingParams, generate  # noqa: E402
from tests.models.hf_fixtures import make_hf_model, random_ids, save_hf_model  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("mixtral")
    hf = make_hf_model("mixtral")
    save_hf_model(hf, d)
    return hf, str(d)


def _hf_out(model, ids, attention_mask=None, **kw):
    with torch.no_grad():
        mask = None if attention_mask is None else torch.tensor(attention_mask)
        return model(torch.tensor(ids, dtype=torch.long), attention_mask=mask, **kw)


def _logits(cfg, params, ids, positions=None, segs=None):
    fn = jax.jit(lambda p, t, pos, s: apply(build_model(cfg), p, t, pos, s)["logits"])
    return np.asarray(fn(params, ids, positions, segs))


@pytest.mark.parametrize("moe_impl", ["ragged", "dense"])
def test_logits_match_hf(tiny, moe_impl):
    hf, path = tiny
    cfg, params = load_hf(path, moe_impl=moe_impl)
    assert cfg.is_moe and (cfg.num_experts, cfg.num_experts_per_tok, cfg.moe_impl) == (4, 2, moe_impl)
    ids = random_ids(2, 14)
    out = _hf_out(hf, ids, output_router_logits=True)
    # The routing is really exercised: every expert is some token's choice, and each layer
    # spreads tokens over at least 3 of the 4.
    chosen = [np.unique(torch.topk(x, 2, dim=-1).indices.numpy()) for x in out.router_logits]
    assert all(len(c) >= 3 for c in chosen) and len(np.unique(np.concatenate(chosen))) == 4
    ref = out.logits.float().numpy()
    ours = _logits(cfg, params, ids)
    assert np.abs(ours - ref).max() < 2e-4, np.abs(ours - ref).max()
    np.testing.assert_allclose(ours, ref, atol=2e-4, rtol=1e-4)


def test_parity_is_sensitive_to_routing(tiny, monkeypatch):
    """Wrong routing (top-k weights not renormalised, top-1, experts permuted, the up and
    gate projections swapped) moves the logits far past the parity tolerance."""
    hf, path = tiny
    cfg, params = load_hf(path)
    ids = random_ids(2, 14)
    ref = _hf_out(hf, ids).logits.float().numpy()
    assert np.abs(_logits(cfg, params, ids) - ref).max() < 2e-4
    moe = params["layers"]["moe"]
    permuted = dict(
        params,
        layers=dict(
            params["layers"],
            moe=dict(
                moe,
                gate_proj=moe["gate_proj"][:, ::-1],
                up_proj=moe["up_proj"][:, ::-1],
                down_proj=moe["down_proj"][:, ::-1],
            ),
        ),
    )
    swapped = dict(
        params, layers=dict(params["layers"], moe=dict(moe, gate_proj=moe["up_proj"], up_proj=moe["gate_proj"]))
    )
    for impl in ("ragged", "dense"):
        c = cfg.replace(moe_impl=impl)
        assert np.abs(_logits(c.replace(num_experts_per_tok=1), params, ids) - ref).max() > 1e-2
        assert np.abs(_logits(c, permuted, ids) - ref).max() > 1e-2
        assert np.abs(_logits(c, swapped, ids) - ref).max() > 1e-2
    with monkeypatch.context() as m:
        m.setattr(decoder, "route", lambda probs, k: jax.lax.top_k(probs, k))
        for impl in ("ragged", "dense"):
            assert np.abs(_logits(cfg.replace(moe_impl=impl), params, ids) - ref).max() > 1e-2


# One case in the default suite; the other scan/remat pairs in the slow suite (~7 s each).
@pytest.mark.parametrize(
    "scan,remat",
    [
        pytest.param(True, "none", marks=pytest.mark.slow),
        (True, "full"),
        pytest.param(False, "dots", marks=pytest.mark.slow),
    ],
)
def test_ragged_equals_dense_values_and_grads(tiny, scan, remat):
    _, path = tiny
    ids = random_ids(2, 10)
    segs = np.ones_like(ids)
    segs[1, 7:] = 0
    results = {}
    for impl in ("ragged", "dense"):
        cfg, params = load_hf(path, moe_impl=impl, scan_layers=scan, remat_policy=remat, output_router_logits=True)
        model = build_model(cfg)

        def loss(p):
            out = apply(model, p, ids, None, segs)
            return jnp.mean(out["logits"] ** 2) + out["moe_aux_loss"], out["moe_aux_loss"]

        (val, aux), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
        results[impl] = (float(val), float(aux), jax.device_get(grads))
    (v0, a0, g0), (v1, a1, g1) = results["ragged"], results["dense"]
    assert abs(v0 - v1) < 1e-5 * abs(v1) and abs(a0 - a1) < 1e-6
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-4), g0, g1)
    # Router and every expert get gradient (the aux loss reaches the router too).
    assert np.abs(g0["layers" if scan else "layers_0"]["moe"]["router"]["kernel"]).max() > 0
    experts = g0["layers"]["moe"]["down_proj"] if scan else g0["layers_0"]["moe"]["down_proj"]
    assert (np.abs(experts).reshape(*experts.shape[:-2], -1).max(-1) > 0).all()


def test_bf16_forward_close_to_hf(tiny):
    hf, path = tiny
    hf16 = make_hf_model("mixtral").to(torch.bfloat16)
    ids = random_ids(2, 10)
    ref = _hf_out(hf16, ids).logits.float().numpy()
    outs = {}
    for impl in ("ragged", "dense"):
        cfg, params = load_hf(path, dtype="bfloat16", param_dtype="bfloat16", moe_impl=impl)
        assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(params))
        outs[impl] = _logits(cfg, params, ids)
        assert np.abs(outs[impl] - ref).max() < 0.05 * np.abs(ref).max()
        assert (outs[impl].argmax(-1) == ref.argmax(-1)).mean() > 0.9
    assert np.abs(outs["ragged"] - outs["dense"]).max() < 0.02 * np.abs(ref).max()
    del hf


def test_aux_loss_matches_hf(tiny):
    """The load-balancing loss equals HF's (load_balancing_loss_func inside
    MixtralForCausalLM) with no padding and with a right-padding attention mask."""
    hf, path = tiny
    cfg, params = load_hf(path, output_router_logits=True)
    assert cfg.router_aux_loss_coef == pytest.approx(0.001)
    model = build_model(cfg)
    ids = random_ids(3, 11)
    lengths = np.array([11, 7, 4])
    mask = (np.arange(11)[None] < lengths[:, None]).astype(np.int32)
    got = {}
    for name, m in (("full", None), ("padded", mask)):
        ref = _hf_out(hf, ids, attention_mask=m, output_router_logits=True)
        # Also straight from the function on the returned router logits.
        direct = transformers.models.mixtral.modeling_mixtral.load_balancing_loss_func(
            ref.router_logits, 4, 2, None if m is None else torch.tensor(m)
        )
        segs = np.ones_like(ids) if m is None else m
        ours = float(jax.jit(lambda p, t, s: apply(model, p, t, None, s)["moe_aux_loss"])(params, ids, segs))
        assert ours == pytest.approx(ref.aux_loss.item(), rel=1e-5, abs=1e-6)
        assert ours == pytest.approx(direct.item(), rel=1e-5, abs=1e-6)
        got[name] = ours
    # Padding really changes it: the mask is honoured, not ignored.
    assert abs(got["full"] - got["padded"]) > 1e-4
    # Dense models and output_router_logits=False return no aux loss.
    out = apply(build_model(cfg.replace(output_router_logits=False)), params, ids)
    assert "moe_aux_loss" not in out


def test_greedy_generation_equals_hf_generate(tiny):
    hf, path = tiny
    cfg, params = load_hf(path)
    prompts = [[1, 10, 20, 30], [1, 7], [1, 3, 4, 5, 6, 8, 9, 11, 12, 13, 14, 15, 16, 17]]
    out = generate(
        build_model(cfg), params, prompts, jax.random.key(0), SamplingParams(max_new_tokens=10, temperature=0.0)
    )
    for i, p in enumerate(prompts):
        with torch.no_grad():
            ref = hf.generate(
                torch.tensor([p]),
                max_new_tokens=10,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=0,
                attention_mask=torch.ones(1, len(p), dtype=torch.long),
            )
        np.testing.assert_array_equal(out.tokens[i], ref[0, len(p) :].numpy())


@pytest.mark.parametrize("scan_layers", [True, False])
def test_round_trip_is_exact(tiny, tmp_path, scan_layers):
    """HF (hub layout, sharded with an index) -> ours -> HF: bit-identical tensors, and the
    result loads in MixtralForCausalLM with the original's logits."""
    hf, _ = tiny
    src = save_hf_model(hf, tmp_path / "src", max_shard_size="100KB")
    assert os.path.exists(os.path.join(src, "model.safetensors.index.json"))
    cfg, params = load_hf(str(src), scan_layers=scan_layers)
    save_hf(str(tmp_path / "dst"), cfg, params, max_shard_bytes=120_000)

    def tensors(d):
        out = {}
        for f in sorted(os.listdir(d)):
            if f.endswith(".safetensors"):
                out.update(load_file(os.path.join(d, f)))
        return out

    a, b = tensors(src), tensors(tmp_path / "dst")
    assert "model.layers.2.block_sparse_moe.experts.3.w2.weight" in b
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert np.array_equal(a[k], b[k]), k
    written = json.loads((tmp_path / "dst" / "config.json").read_text())
    assert written["model_type"] == "mixtral" and written["num_local_experts"] == 4
    assert written["num_experts_per_tok"] == 2
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "dst")).eval()
    assert type(reloaded).__name__ == "MixtralForCausalLM"
    ids = random_ids(2, 9)
    np.testing.assert_array_equal(_hf_out(reloaded, ids).logits.numpy(), _hf_out(hf, ids).logits.numpy())


def test_fused_layout_loads(tiny, tmp_path):
    """transformers 5.x's in-memory layout (mlp.gate, mlp.experts.gate_up_proj / down_proj),
    as a state_dict dump writes it, loads to the same params as the hub layout."""
    hf, path = tiny
    sd = {k: v.detach().numpy().copy() for k, v in hf.state_dict().items()}
    assert sd["model.layers.0.mlp.experts.gate_up_proj"].shape == (4, 2 * 96, 64)
    save_file(sd, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    shutil.copy(os.path.join(path, "config.json"), tmp_path / "config.json")
    mesh = shd.make_mesh(1, 2, 4)  # reads slices of the fused tensors
    _, fused = load_hf(str(tmp_path), layout=shd.Layout(mesh, shd.logical_rules()))
    _, hub = load_hf(path)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), fused, hub)


# -- sharding ----------------------------------------------------------------------------------

CFG = DecoderConfig(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    num_layers=2,
    num_heads=8,
    num_kv_heads=4,
    model_type="mixtral",
    num_experts=4,
    num_experts_per_tok=2,
    output_router_logits=True,
    initializer_range=0.1,
)


def _batch():
    rs = np.random.RandomState(0)
    tokens = rs.randint(0, 128, (8, 12)).astype(np.int32)
    segs = np.ones((8, 12), np.int32)
    segs[3, 9:] = 0
    segs[5, 4:] = 2
    pos = np.where(segs == 2, np.arange(12) - 4, np.arange(12)).astype(np.int32)
    return tokens, pos, segs


def _loss(model):
    def loss(params, tokens, pos, segs):
        out = apply(model, params, tokens, pos, segs)
        logp = jax.nn.log_softmax(out["logits"][:, :-1], -1)
        tgt = jnp.take_along_axis(logp, tokens[:, 1:, None], -1)[..., 0]
        nll = -(tgt * (segs[:, 1:] > 0)).sum() / (segs[:, 1:] > 0).sum()
        return nll + out["moe_aux_loss"], (out["logits"], out["moe_aux_loss"])

    return loss


@pytest.fixture(scope="module")
def reference():
    assert jax.device_count() == 8, "tests/conftest.py should give 8 CPU devices"
    model = build_model(CFG)
    params = init_params(model, jax.random.key(0))
    (loss, (logits, aux)), g = jax.jit(jax.value_and_grad(_loss(model), has_aux=True))(params, *_batch())
    return jax.device_get(params), float(loss), np.asarray(logits), float(aux), jax.device_get(g)


@pytest.mark.parametrize(
    "sizes,impl",
    # (2, 2, 2) splits every axis at once; the one-axis meshes are in the slow suite (~8 s each).
    [
        pytest.param((8, 1, 1), "ragged", marks=pytest.mark.slow),
        pytest.param((1, 8, 1), "ragged", marks=pytest.mark.slow),
        ((2, 2, 2), "ragged"),
        pytest.param((1, 2, 4), "ragged", marks=pytest.mark.slow),
        ((2, 2, 2), "dense"),
    ],
)
def test_sharded_forward_and_grad_match_single_device(reference, sizes, impl):
    params0, l0, logits0, aux0, g0 = reference
    mesh = shd.make_mesh(*sizes)
    model = build_model(CFG.replace(moe_impl=impl), layout=shd.Layout(mesh, shd.logical_rules()))
    params = init_params(model, jax.random.key(0))
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), params, params0)
    data, fsdp, tensor = sizes
    w = params["layers"]["moe"]["gate_proj"]  # [layers, expert, embed, mlp]
    assert tuple(w.sharding.spec) == (None, None, "fsdp", "tensor")
    assert w.addressable_shards[0].data.shape == (2, 4, 64 // fsdp, 128 // tensor)
    fn = jax.jit(jax.value_and_grad(_loss(model), has_aux=True))
    (loss, (logits, aux)), g = fn(params, *shd.shard_batch(_batch(), mesh))
    assert abs(float(loss) - l0) < 1e-5 and abs(float(aux) - aux0) < 1e-6
    np.testing.assert_allclose(np.asarray(logits), logits0, atol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), b, atol=1e-6, rtol=1e-4), g, g0)


@pytest.mark.slow  # ~12 s; tests/models/test_sharding.py checks the dense model's sampler under a mesh
def test_sampler_under_mesh_matches_single_device():
    model = build_model(CFG)
    params = init_params(model, jax.random.key(1))
    # 6 rows: the batch does not split over data x fsdp = 4, so part of the mesh replicates it.
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8], [9], [10, 11], [12, 13, 14], [15]]
    sp = SamplingParams(max_new_tokens=6, temperature=0.8, top_p=0.9)
    ref = generate(model, params, prompts, jax.random.key(2), sp)
    mesh = shd.make_mesh(2, 2, 2)
    on_mesh = build_model(CFG, layout=shd.Layout(mesh, shd.logical_rules()))
    out = generate(on_mesh, init_params(on_mesh, jax.random.key(1)), prompts, jax.random.key(2), sp)
    np.testing.assert_array_equal(out.tokens, ref.tokens)
    np.testing.assert_allclose(out.logprobs, ref.logprobs, atol=1e-5)


# -- config, jitter, objectives ------------------------------------------------------------------


def test_config_from_hf_fields_and_back(tmp_path):
    # transformers 4.x spelling (rope_theta at top level, no rope_parameters).
    legacy = dict(
        model_type="mixtral",
        architectures=["MixtralForCausalLM"],
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        rms_norm_eps=1e-5,
        rope_theta=1e6,
        max_position_embeddings=32768,
        sliding_window=None,
        num_local_experts=8,
        num_experts_per_tok=2,
        router_aux_loss_coef=0.02,
        output_router_logits=False,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        hidden_act="silu",
    )
    (tmp_path / "config.json").write_text(json.dumps(legacy))
    cfg = DecoderConfig.from_pretrained(str(tmp_path))
    assert (cfg.num_experts, cfg.num_experts_per_tok, cfg.router_aux_loss_coef) == (8, 2, 0.02)
    assert cfg.rope_theta == 1e6 and cfg.sliding_window is None and cfg.router_jitter_noise == 0.0
    assert cfg.num_params() / 1e9 == pytest.approx(46.70, abs=0.01)
    assert cfg.num_params(active=True) / 1e9 == pytest.approx(12.88, abs=0.01)
    hf = cfg.replace(router_jitter_noise=0.01, output_router_logits=True).to_hf()
    assert isinstance(hf, transformers.MixtralConfig)
    assert (hf.num_local_experts, hf.num_experts_per_tok, hf.router_jitter_noise, hf.output_router_logits) == (
        8,
        2,
        0.01,
        True,
    )
    back = DecoderConfig.from_hf(hf)
    assert back.num_experts == 8 and back.router_jitter_noise == 0.01 and back.output_router_logits
    kw = dict(vocab_size=8, hidden_size=8, intermediate_size=8, num_layers=1, num_heads=2, num_kv_heads=2)
    with pytest.raises(ValueError, match="num_experts_per_tok"):
        DecoderConfig(model_type="mixtral", num_experts=2, num_experts_per_tok=3, **kw)
    with pytest.raises(ValueError, match="mixtral"):
        DecoderConfig(model_type="mixtral", **kw)
    with pytest.raises(ValueError, match="mixtral"):
        DecoderConfig(num_experts=4, **kw)
    with pytest.raises(ValueError, match="moe_impl"):
        DecoderConfig(model_type="mixtral", num_experts=4, moe_impl="megablox", **kw)


def test_router_jitter_only_with_a_router_rng():
    cfg = CFG.replace(router_jitter_noise=0.3)
    params = init_params(build_model(CFG), jax.random.key(0))
    tokens, pos, segs = _batch()
    base = apply(build_model(CFG), params, tokens, pos, segs)["logits"]
    quiet = apply(build_model(cfg), params, tokens, pos, segs)["logits"]
    np.testing.assert_array_equal(np.asarray(quiet), np.asarray(base))
    noisy = apply(build_model(cfg), params, tokens, pos, segs, rngs={"router": jax.random.key(1)})["logits"]
    assert np.abs(np.asarray(noisy) - np.asarray(base)).max() > 1e-3


def _sft_batch():
    tokens, pos, segs = _batch()
    return {
        "tokens": tokens,
        "positions": pos,
        "segment_ids": segs,
        "loss_mask": ((segs > 0) & (pos > 0)).astype(np.int32),
    }


# DPO (two forward passes) in the default suite; SFT and the reward model in the slow one.
@pytest.mark.parametrize(
    "objective", [pytest.param("sft", marks=pytest.mark.slow), "dpo", pytest.param("reward", marks=pytest.mark.slow)]
)
def test_objectives_add_the_aux_loss(objective):
    from rlaif_jax.train.dpo import DPO
    from rlaif_jax.train.reward import RewardModel
    from rlaif_jax.train.sft import SFT

    obj = {"sft": SFT(), "dpo": DPO(reference="none"), "reward": RewardModel()}[objective]
    b = _sft_batch()
    if objective == "sft":
        batch = b
    else:
        half = {k: v[:4] for k, v in b.items()}
        other = {k: v[4:] for k, v in b.items()}
        batch = {**{f"chosen_{k}": v for k, v in half.items()}, **{f"rejected_{k}": v for k, v in other.items()}}
    results = {}
    for with_aux in (False, True):
        cfg = CFG.replace(output_router_logits=with_aux, router_aux_loss_coef=0.5)
        model = build_model(cfg, lm_head=obj.lm_head, scalar_heads=obj.scalar_heads)
        params = init_params(model, jax.random.key(0))
        loss_sum, weight, metrics = jax.jit(lambda p: obj.loss(model, p, batch, None, jax.random.key(0)))(params)
        results[with_aux] = (float(loss_sum / weight), {k: float(s / c) for k, (s, c) in metrics.items()})
    (plain, m0), (total, m1) = results[False], results[True]
    assert "moe/aux_loss" not in m0 and m1["moe/aux_loss"] > 0
    assert total == pytest.approx(plain + 0.5 * m1["moe/aux_loss"], rel=1e-5)


def test_train_step_logs_aux_loss_with_accumulation():
    from rlaif_jax.train.sft import SFT
    from rlaif_jax.train.step import create_state, make_eval_step, make_train_step

    cfg = CFG.replace(router_jitter_noise=0.1)
    model = build_model(cfg)
    params = init_params(model, jax.random.key(0))
    tx = optax.sgd(1e-2)
    step = jax.jit(make_train_step(SFT(), model, tx, lambda s: 1e-2, grad_accum=2))
    state, metrics = step(create_state(params, tx, 0), _sft_batch(), None)
    assert np.isfinite(float(metrics["moe/aux_loss"])) and float(metrics["moe/aux_loss"]) > 0
    assert int(state.nonfinite_step) == -1
    # Evaluation sees no jitter: two evaluations agree exactly and equal the jitter-free model's.
    ev = jax.jit(make_eval_step(SFT(), model))
    ev_plain = jax.jit(make_eval_step(SFT(), build_model(CFG)))
    a, b = ev(params, _sft_batch(), None), ev_plain(params, _sft_batch(), None)
    assert float(a["loss"][0]) == float(b["loss"][0])


def test_ppo_loss_adds_the_aux_loss():
    from rlaif_jax.train.ppo import PPOConfig, PPOTrainer

    config = PPOConfig(rollout_batch_size=4, mini_batch_size=4, max_new_tokens=4, value_model="shared")
    tokens, pos, segs = (x[:4] for x in _batch())
    R = 4
    rs = np.random.RandomState(1)
    mb = dict(
        tokens=tokens,
        positions=pos,
        segment_ids=segs,
        mask=(segs[:, -R:] > 0).astype(np.float32),
        old_logp=rs.normal(-3, 1, (4, R)).astype(np.float32),
        old_values=np.zeros((4, R), np.float32),
        advantages=rs.normal(size=(4, R)).astype(np.float32),
        returns=np.ones((4, R), np.float32),
    )
    out = {}
    for with_aux in (False, True):
        cfg = CFG.replace(output_router_logits=with_aux, router_aux_loss_coef=0.5)
        trainer = PPOTrainer(cfg, config, optax.sgd(0.1), None, ref_params=None, reward_fn=lambda *a: 0.0)
        params = {"policy": init_params(trainer.policy, jax.random.key(0))}
        out[with_aux] = jax.jit(trainer._loss)(params, mb)
    (l0, m0), (l1, m1) = out[False], out[True]
    assert "moe/aux_loss" not in m0 and float(m1["moe/aux_loss"]) > 0
    assert float(l1) == pytest.approx(float(l0) + 0.5 * float(m1["moe/aux_loss"]), rel=1e-5)


def test_reward_model_export(tiny, tmp_path):
    from rlaif_jax.models import gather_last

    _, path = tiny
    cfg, params = load_hf(path, lm_head=False)
    model = build_model(cfg, lm_head=False, scalar_heads=("score",))
    params = dict(params, score_head=init_params(model, jax.random.key(0))["score_head"])
    ids = random_ids(1, 6)
    reward = float(gather_last(apply(model, params, ids)["score"], np.ones_like(ids))[0])
    save_hf(str(tmp_path / "rm"), cfg, params, score_head=True)
    rm = transformers.AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "rm")).eval()
    assert type(rm).__name__ == "MixtralForSequenceClassification"
    with torch.no_grad():
        assert abs(rm(torch.tensor(ids)).logits[0, 0].item() - reward) < 1e-4
