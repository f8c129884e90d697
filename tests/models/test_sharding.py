"""Forward, gradients, HF import and sampling under (data, fsdp, tensor) meshes of 8 fake CPU
devices match the single-device results, and params really are sharded."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding

from rlaif_jax import sharding as shd
from rlaif_jax.models import DecoderConfig, apply, build_model, init_params
from rlaif_jax.sampling import SamplingParams, generate

MESHES = [(8, 1, 1), (1, 8, 1), (2, 2, 2), (1, 2, 4)]

CFG = DecoderConfig(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    num_layers=2,
    num_heads=8,
    num_kv_heads=4,
    sliding_window=6,
    model_type="mistral",
)


def _batch():
    rs = np.random.RandomState(0)
    tokens = rs.randint(0, 128, (8, 12)).astype(np.int32)
    segs = np.ones((8, 12), np.int32)
    segs[3, 9:] = 0
    segs[5, 4:] = 2  # a packed second sequence
    pos = np.where(segs == 2, np.arange(12) - 4, np.arange(12)).astype(np.int32)
    return tokens, pos, segs


def _layout(mesh):
    return shd.Layout(mesh, shd.logical_rules())


def _loss(model):
    def loss(params, tokens, pos, segs):
        out = apply(model, params, tokens, pos, segs)
        logp = jax.nn.log_softmax(out["logits"][:, :-1], -1)
        tgt = jnp.take_along_axis(logp, tokens[:, 1:, None], -1)[..., 0]
        return -(tgt * (segs[:, 1:] > 0)).sum() / (segs[:, 1:] > 0).sum(), out["logits"]

    return loss


@pytest.fixture(scope="module")
def reference():
    assert jax.device_count() == 8, "tests/conftest.py should give 8 CPU devices"
    model = build_model(CFG)
    params = init_params(model, jax.random.key(0))
    (loss, logits), g = jax.jit(jax.value_and_grad(_loss(model), has_aux=True))(params, *_batch())
    return model, jax.device_get(params), float(loss), np.asarray(logits), jax.device_get(g)


# (8, 1, 1) and (2, 2, 2) in the default suite (every axis split at least once); the rest slow.
@pytest.mark.parametrize(
    "sizes", [m if m in ((8, 1, 1), (2, 2, 2)) else pytest.param(m, marks=pytest.mark.slow) for m in MESHES]
)
def test_sharded_forward_and_grad_match_single_device(reference, sizes):
    _, params0, l0, logits0, g0 = reference
    mesh = shd.make_mesh(*sizes)
    model = build_model(CFG, layout=_layout(mesh))
    params = init_params(model, jax.random.key(0))
    # Initialisation is sharding-independent: same key, same values.
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), params, params0)
    batch = shd.shard_batch(_batch(), mesh)
    fn = jax.jit(jax.value_and_grad(_loss(model), has_aux=True))
    (loss, logits), g = fn(params, *batch)
    assert abs(float(loss) - l0) < 1e-5
    np.testing.assert_allclose(np.asarray(logits), logits0, atol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), b, atol=1e-6, rtol=1e-4), g, g0)


@pytest.mark.parametrize("sizes", MESHES)
def test_params_are_really_sharded(sizes):
    data, fsdp, tensor = sizes
    mesh = shd.make_mesh(*sizes)
    params = init_params(build_model(CFG, layout=_layout(mesh)), jax.random.key(0))
    q = params["layers"]["attn"]["q_proj"]["kernel"]  # [layers, embed, heads, head_dim]
    assert isinstance(q.sharding, NamedSharding)
    assert tuple(q.sharding.spec) == (None, "fsdp", "tensor", None)
    shard = q.addressable_shards[0].data.shape
    assert shard == (2, 64 // fsdp, 8 // tensor, 8)
    emb = params["embed"]["embedding"]  # [vocab, embed]
    assert emb.addressable_shards[0].data.shape == (128 // tensor, 64 // fsdp)
    down = params["layers"]["mlp"]["down_proj"]["kernel"]  # [layers, mlp, embed]
    assert down.addressable_shards[0].data.shape == (2, 128 // tensor, 64 // fsdp)


def test_mesh_sizes_and_indivisible_dims():
    assert dict(shd.make_mesh(-1, 2, 2).shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    with pytest.raises(ValueError, match="does not match"):
        shd.make_mesh(2, 2, 1)
    with pytest.raises(ValueError, match="at most one"):
        shd.make_mesh(-1, -1, 1)
    # 6 kv heads cannot split over tensor=4: that dim is replicated, the rest still sharded.
    mesh = shd.make_mesh(1, 2, 4)
    cfg = CFG.replace(num_heads=6, num_kv_heads=6, head_dim=8)
    params = init_params(build_model(cfg, layout=_layout(mesh)), jax.random.key(0))
    k = params["layers"]["attn"]["k_proj"]["kernel"]
    assert tuple(k.sharding.spec) == (None, "fsdp", None, None)
    rules = shd.logical_rules(overrides=[("embed", None), ("heads", None)])
    assert dict(rules)["embed"] is None and dict(rules)["mlp"] == "tensor"


def test_hf_import_straight_into_shards(tmp_path):
    torch = pytest.importorskip("torch")
    from rlaif_jax.models.hf_io import load_hf
    from tests.models.hf_fixtures import make_hf_model, save_hf_model

    hf = make_hf_model("llama2_gqa")
    save_hf_model(hf, tmp_path, max_shard_size="40KB")
    cfg, ref = load_hf(str(tmp_path))
    mesh = shd.make_mesh(2, 2, 2)
    _, params = load_hf(str(tmp_path), layout=_layout(mesh))
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), params, ref)
    expected = init_params(build_model(cfg, layout=_layout(mesh)), jax.random.key(0))
    jax.tree.map(
        lambda a, b: a.sharding.is_equivalent_to(b.sharding, a.ndim) or pytest.fail("sharding"), params, expected
    )
    assert params["layers"]["attn"]["k_proj"]["kernel"].addressable_shards[0].data.shape == (3, 32, 1, 16)
    del torch


def test_sampler_under_mesh_matches_single_device():
    model = build_model(CFG)
    params = init_params(model, jax.random.key(1))
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8], [9], [10, 11], [12, 13, 14], [15], [16, 17], [18, 19, 20, 21]]
    sp = SamplingParams(max_new_tokens=6, temperature=0.8, top_p=0.9)
    ref = generate(model, params, prompts, jax.random.key(2), sp)
    mesh = shd.make_mesh(2, 2, 2)
    on_mesh = build_model(CFG, layout=_layout(mesh))
    sharded = init_params(on_mesh, jax.random.key(1))
    out = generate(on_mesh, sharded, prompts, jax.random.key(2), sp)
    np.testing.assert_array_equal(out.tokens, ref.tokens)
    np.testing.assert_allclose(out.logprobs, ref.logprobs, atol=1e-5)


def test_a_model_built_for_a_mesh_always_constrains():
    """The layout travels with the model: a plain jitted apply (no mesh argument anywhere)
    lowers with the activation sharding constraints (embeddings and block outputs over the
    batch axes, the MLP and the logits also over tensor); a model built without a layout
    refuses params placed on a mesh instead of silently running them unconstrained."""
    mesh = shd.make_mesh(1, 2, 4)
    model = build_model(CFG, layout=_layout(mesh))
    params = init_params(model, jax.random.key(0))
    tokens, pos, segs = shd.shard_batch(_batch(), mesh)
    text = jax.jit(lambda p, t, po, s: apply(model, p, t, po, s)["logits"]).lower(params, tokens, pos, segs).as_text()
    constraints = re.findall(r"sdy\.sharding_constraint %\S+ <@mesh, \[(.*?)\]>", text)
    assert '{"data", "fsdp"}, {}, {}' in constraints  # [batch, length, embed]
    assert '{"data", "fsdp"}, {}, {"tensor"}' in constraints  # [batch, length, mlp / vocab]
    unplaced = build_model(CFG)
    with pytest.raises(ValueError, match="without a layout"):
        jax.jit(lambda p, t: apply(unplaced, p, t)["logits"])(params, tokens)
    with pytest.raises(ValueError, match="without a layout"):
        generate(unplaced, params, [[1, 2, 3]], jax.random.key(0), SamplingParams(max_new_tokens=2))
