"""LoRA / QLoRA (rlaif_jax.lora): adapters off = base, merged export = adapted model, only the
adapters train, the DPO reference is the base with adapters off, exact resume, NF4 against
bitsandbytes' code table."""

from __future__ import annotations

import dataclasses
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.scipy.stats import norm
from safetensors.numpy import load_file

from rlaif_jax import sharding as shd
from rlaif_jax.lora import LoraModel, LoraSettings, init_adapters, merge, merged_weights, quant, quantize_base
from rlaif_jax.lora.peft_io import load_peft, save_peft
from rlaif_jax.lora.training import BASE_POINTER, PEFT_SUBDIR, prepare
from rlaif_jax.models import apply, build_model, init_params
from rlaif_jax.models.hf_io import load_hf, save_hf
from rlaif_jax.train import DPO, SFT, RewardModel, make_optimizer
from rlaif_jax.train.loop import LoopSettings, train
from rlaif_jax.train.metrics import read_jsonl
from tests.train.fixtures import make_world, pref_data, sft_data, tiny_config

ONE_DEVICE = functools.partial(shd.make_mesh, 1, 1, 1, devices=jax.devices()[:1])


def _logits(model, params, tokens):
    # One compiled forward pass: op by op, a tiny model's forward takes seconds on a busy CPU.
    return jax.jit(lambda p, t: apply(model, p, t)["logits"])(params, tokens)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    tok, tok_dir, demos, prefs = make_world(str(root))
    cfg = tiny_config(len(tok))
    base = str(root / "base")
    save_hf(base, cfg, init_params(build_model(cfg), jax.random.key(0)), tokenizer=tok)
    return dict(tok=tok, tok_dir=tok_dir, demos=demos, prefs=prefs, cfg=cfg, base=base)


def _random_adapters(model, settings, seed=1):
    ad = init_adapters(model, settings, jax.random.key(seed))
    # B = 0 at init: perturb every leaf so the adapters change the logits.
    leaves, tree = jax.tree.flatten(ad)
    keys = jax.random.split(jax.random.key(seed + 100), len(leaves))
    return jax.tree.unflatten(tree, [x + 0.05 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])


# Unscanned layers in the slow suite: the default suite's ~60 s budget (tests/lora: ~50 s).
@pytest.mark.parametrize("scan", [True, pytest.param(False, marks=pytest.mark.slow)])
def test_zero_b_is_the_base_and_the_merged_export_is_the_adapted_model(world, tmp_path, scan):
    cfg = tiny_config(len(world["tok"]), scan_layers=scan)
    model = build_model(cfg)
    params = init_params(model, jax.random.key(0))
    settings = LoraSettings(rank=4, alpha=8.0, rslora=scan)
    tokens = jax.random.randint(jax.random.key(2), (2, 12), 3, cfg.vocab_size)
    base = _logits(model, params, tokens)
    lm = LoraModel(model, settings)
    fresh = init_adapters(model, settings, jax.random.key(1))
    np.testing.assert_array_equal(_logits(lm, merge(params, fresh), tokens), base)

    adapters = _random_adapters(model, settings)
    adapted = _logits(lm, merge(params, adapters), tokens)
    assert float(jnp.abs(adapted - base).max()) > 1e-2
    dropped = LoraModel(model, dataclasses.replace(settings, dropout=0.5)).with_dropout(jax.random.key(9))
    assert float(jnp.abs(_logits(dropped, merge(params, adapters), tokens) - adapted).max()) > 1e-3
    save_hf(str(tmp_path), cfg, merged_weights(merge(params, adapters), settings))
    _, exported = load_hf(str(tmp_path), config=cfg)
    np.testing.assert_allclose(_logits(model, exported, tokens), adapted, atol=1e-5, rtol=0)


def test_peft_loads_our_adapter_on_transformers_llama_and_we_load_it_back(world, tmp_path):
    peft = pytest.importorskip("peft", reason="PEFT interop needs peft (pip install peft)")
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    cfg = world["cfg"]
    model = build_model(cfg)
    _, params = load_hf(world["base"], config=cfg)
    settings = LoraSettings(rank=4, alpha=32.0, targets=r"(q|v|o|down)_proj$")
    adapters = _random_adapters(model, settings)
    save_peft(str(tmp_path), cfg, adapters, settings, world["base"])
    tokens = np.random.RandomState(0).randint(3, cfg.vocab_size, (2, 12))
    ours = _logits(LoraModel(model, settings), merge(params, adapters), jnp.asarray(tokens))
    hf = transformers.AutoModelForCausalLM.from_pretrained(world["base"], dtype=torch.float32)
    with torch.no_grad():
        theirs = peft.PeftModel.from_pretrained(hf, str(tmp_path))(torch.tensor(tokens)).logits.numpy()
    np.testing.assert_allclose(np.asarray(ours), theirs, atol=1e-4, rtol=0)
    back = load_peft(str(tmp_path), model, settings)
    jax.tree.map(np.testing.assert_array_equal, back, adapters)
    with pytest.raises(Exception, match="lora_alpha = 32.0 but LoraSettings.alpha"):
        load_peft(str(tmp_path), model, LoraSettings(rank=4, alpha=16.0, targets=settings.targets))


def test_reward_model_peft_export_scores_as_ours_on_transformers_and_starts_a_run(world, tmp_path):
    """A LoRA reward model's PEFT export: SEQ_CLS, the score head in modules_to_save; PEFT on
    LlamaForSequenceClassification gives our scores, and the directory starts a run again."""
    peft = pytest.importorskip("peft", reason="PEFT interop needs peft (pip install peft)")
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from rlaif_jax.lora.training import LoraRun

    cfg = world["cfg"]
    obj = RewardModel()
    model = build_model(cfg, lm_head=False, scalar_heads=obj.scalar_heads)
    params = init_params(model, jax.random.key(0))
    rm_base = str(tmp_path / "rm_base")
    save_hf(rm_base, cfg, params, score_head=True)
    settings = LoraSettings(rank=4, alpha=16.0, targets=r"(q|v|o|up)_proj$")
    run = prepare(obj, model, params, settings, seed=0)
    score = run.trainable["score_head"]["kernel"]
    trainable = merge(
        {"score_head": {"kernel": score + 0.5 * jax.random.normal(jax.random.key(7), score.shape)}},
        _random_adapters(model, settings),
    )
    out = str(tmp_path / "hf")
    LoraRun.export(run, out, cfg, trainable, base_model=rm_base)
    peft_dir = os.path.join(out, PEFT_SUBDIR)
    config = json.load(open(os.path.join(peft_dir, "adapter_config.json")))
    assert config["task_type"] == "SEQ_CLS" and config["modules_to_save"] == ["score"]

    tokens = np.random.RandomState(0).randint(3, cfg.vocab_size, (3, 12))
    apply_score = jax.jit(lambda p, t: apply(LoraModel(model, settings), p, t)["score"][:, -1])
    ours = np.asarray(apply_score(run.full_params(trainable), jnp.asarray(tokens)))
    hf = transformers.LlamaForSequenceClassification.from_pretrained(rm_base, dtype=torch.float32)
    with torch.no_grad():
        theirs = peft.PeftModel.from_pretrained(hf, peft_dir)(torch.tensor(tokens)).logits[:, 0].numpy()
        merged = transformers.LlamaForSequenceClassification.from_pretrained(out, dtype=torch.float32)
        merged_scores = merged(torch.tensor(tokens)).logits[:, 0].numpy()
    assert float(np.abs(ours - np.asarray(apply_score(params, jnp.asarray(tokens)))).max()) > 1e-2  # adapted
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)
    np.testing.assert_allclose(merged_scores, theirs, atol=1e-4, rtol=0)

    # Back as a run's starting point: the adapters and the score head.
    again = prepare(obj, model, params, dataclasses.replace(settings, init_adapter=peft_dir), seed=1)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-7), again.trainable, trainable)
    # A language model given a reward model's adapter: refused, not its head silently dropped.
    lm = build_model(cfg)
    with pytest.raises(Exception, match="is a reward model's adapter"):
        prepare(SFT(), lm, init_params(lm, jax.random.key(0)), dataclasses.replace(settings, init_adapter=peft_dir), 0)


def test_reward_model_trains_adapters_and_a_fresh_score_head(world):
    cfg = world["cfg"]
    obj = RewardModel()
    model = build_model(cfg, lm_head=False, scalar_heads=obj.scalar_heads)
    params = init_params(model, jax.random.key(0))
    run = prepare(obj, model, params, LoraSettings(rank=2), seed=0)
    assert set(run.trainable) == {"score_head", "layers"}
    assert "score_head" not in run.frozen["base"] and run.frozen["reference"] is None
    leaves = jax.tree_util.tree_leaves_with_path(run.trainable["layers"])
    assert leaves and all(str(p[-1].key).startswith("lora_") for p, _ in leaves)


# -- NF4 / int8 -------------------------------------------------------------------------------

# bitsandbytes' NF4 levels (bitsandbytes/functional.py get_4bit_type("nf4"), csrc/kernels.cu
# dDequantizeNF4), i.e. QLoRA's NormalFloat4 (Dettmers et al. 2023, arXiv:2305.14314).
BNB_NF4 = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
]  # fmt: skip


def test_nf4_code_is_bitsandbytes_and_qloras_normal_quantiles():
    np.testing.assert_array_equal(quant.NF4_CODE, np.asarray(BNB_NF4, np.float32))
    # The construction (bitsandbytes create_normal_map, offset 0.9677): 8 positive and 7
    # negative quantiles of N(0, 1), zero, normalised by the largest.
    off = 0.9677083
    pos = norm.ppf(jnp.linspace(off, 0.5, 9)[:-1])
    neg = -norm.ppf(jnp.linspace(off, 0.5, 8)[:-1])
    v = jnp.sort(jnp.concatenate([pos, jnp.zeros(1), neg]))
    np.testing.assert_allclose(v / v.max(), quant.NF4_CODE, atol=2e-6)


def test_nf4_and_int8_dequantise_as_blockwise_absmax_references():
    rng = np.random.RandomState(0)
    w = rng.standard_normal((128, 3, 5)).astype(np.float32) * 0.02  # [in, heads, head_dim]
    q = quant.quantize(jnp.asarray(w), 1, "nf4", block=64)
    assert q[quant.CODES].dtype == jnp.uint8 and q[quant.CODES].shape == (64, 15)
    got = np.asarray(quant.dequantize(q, "nf4", w.shape, jnp.float32, 64))
    # Reference: per (block of 64 inputs, output column) absmax, nearest level by distance.
    m = w.reshape(2, 64, 15)
    absmax = np.abs(m).max(axis=1, keepdims=True)
    idx = np.abs((m / absmax)[..., None] - np.asarray(BNB_NF4)).argmin(-1)
    np.testing.assert_allclose(got, (np.asarray(BNB_NF4)[idx] * absmax).reshape(w.shape), atol=1e-7)
    packed = np.asarray(q[quant.CODES])
    np.testing.assert_array_equal(packed >> 4, idx.reshape(128, 15)[0::2])  # first of a pair high, as bnb
    q8 = quant.quantize(jnp.asarray(w), 1, "int8")
    err = np.abs(np.asarray(quant.dequantize(q8, "int8", w.shape, jnp.float32)) - w).max(axis=0)
    assert np.all(err <= np.abs(w).max(axis=0) / 127 / 2 + 1e-8)


@pytest.mark.parametrize("kind", [pytest.param("int8", marks=pytest.mark.slow), "nf4"])
def test_qlora_runs_the_dequantised_base(world, kind):
    cfg = world["cfg"]
    model = build_model(cfg)
    params = init_params(model, jax.random.key(0))
    settings = LoraSettings(rank=4, quantize=kind, block_size=16)
    qbase = quantize_base(params, settings)
    assert "kernel" not in qbase["layers"]["attn"]["q_proj"] and "kernel" in qbase["lm_head"]
    adapters = _random_adapters(model, settings)
    tokens = jax.random.randint(jax.random.key(2), (2, 12), 3, cfg.vocab_size)
    got = _logits(LoraModel(model, settings), merge(qbase, adapters), tokens)
    run = prepare(SFT(), model, params, settings, seed=0)
    want = _logits(model, run.merged(adapters), tokens)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


# -- in the trainer -----------------------------------------------------------------------------


def _dpo_args(world, run_dir, **kw):
    args = dict(
        run_dir=run_dir,
        objective=DPO(beta=0.5),
        train_data=pref_data(world["prefs"]),
        num_steps=6,
        init_from=world["base"],
        tokenizer=world["tok_dir"],
        optimizer=functools.partial(make_optimizer, learning_rate=3e-3),
        mesh=ONE_DEVICE,
        loop=LoopSettings(log_every=2, checkpoint_every=2, async_checkpoint=False),
        lora=LoraSettings(rank=4, alpha=8.0),
    )
    args.update(kw)
    return args


@pytest.fixture(scope="module")
def lora_dpo(world, tmp_path_factory):
    run = str(tmp_path_factory.mktemp("lora_dpo"))
    train(**_dpo_args(world, run))
    return run


def test_lora_dpo_moves_only_the_adapters(world, lora_dpo):
    pointer = json.load(open(os.path.join(lora_dpo, BASE_POINTER)))
    assert pointer["init_from"] == os.path.abspath(world["base"]) and pointer["rank"] == 4
    rows = read_jsonl(os.path.join(lora_dpo, "metrics.jsonl"))
    assert rows[-1]["rewards/accuracies"] > 0 and rows[-1]["loss"] < rows[0]["loss"]
    base = load_file(os.path.join(world["base"], "model.safetensors"))
    merged = load_file(os.path.join(lora_dpo, "hf", "model.safetensors"))
    peft_dir = os.path.join(lora_dpo, "hf", PEFT_SUBDIR)
    adapter = load_file(os.path.join(peft_dir, "adapter_model.safetensors"))
    scale = json.load(open(os.path.join(peft_dir, "adapter_config.json")))["lora_alpha"] / 4
    moved = 0
    for k, w in base.items():
        a_key = "base_model.model." + k.replace(".weight", ".lora_A.weight")
        if a_key in adapter:  # W + s B A, B and A from the exported adapter
            delta = scale * adapter[a_key.replace("lora_A", "lora_B")] @ adapter[a_key]
            np.testing.assert_allclose(merged[k], w + delta, atol=1e-6, err_msg=k)
            moved += float(np.abs(delta).max()) > 0
        else:  # embeddings, norms, LM head: bit-identical to the base
            np.testing.assert_array_equal(merged[k], w, err_msg=k)
    assert moved == 2 * 7  # every adapter of both layers trained


def test_dpo_reference_adapters_off_equals_an_explicit_copy_of_the_base(world, lora_dpo, tmp_path):
    train(**_dpo_args(world, str(tmp_path), num_steps=2, reference_from=world["base"]))
    a = read_jsonl(os.path.join(lora_dpo, "metrics.jsonl"))[0]
    b = read_jsonl(os.path.join(tmp_path, "metrics.jsonl"))[0]
    for k in ("loss", "rewards/margins", "logps/chosen", "grad_norm"):
        assert a[k] == pytest.approx(b[k], rel=1e-6, abs=1e-9), k


@pytest.mark.slow  # three short runs: ~25 s on an idle 2-core CPU
def test_lora_resume_after_preemption_is_bit_identical(world, lora_dpo, tmp_path):
    run = str(tmp_path / "resumed")
    train(**_dpo_args(world, run, stop_after=5))  # killed after step 5; checkpoint at 4
    train(**_dpo_args(world, run))
    for name in ("model.safetensors", os.path.join(PEFT_SUBDIR, "adapter_model.safetensors")):
        a, b = load_file(os.path.join(lora_dpo, "hf", name)), load_file(os.path.join(run, "hf", name))
        assert set(a) == set(b)
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    # Resuming onto another base is refused: the checkpoints are only adapters.
    with pytest.raises(Exception, match="LoRA adapters of the base"):
        train(**_dpo_args(world, run, init_from=None, model_config=world["cfg"], num_steps=8))


@pytest.mark.slow
def test_qlora_sft_from_a_peft_adapter(world, tmp_path):
    settings = LoraSettings(rank=4, quantize="nf4", block_size=16)
    cfg = world["cfg"]
    start = str(tmp_path / "start")
    save_peft(start, cfg, _random_adapters(build_model(cfg), settings), settings)
    out = train(
        run_dir=str(tmp_path / "run"),
        objective=SFT(),
        train_data=sft_data(world["demos"]),
        num_steps=2,
        init_from=world["base"],
        tokenizer=world["tok_dir"],
        mesh=ONE_DEVICE,
        loop=LoopSettings(log_every=1),
        lora=dataclasses.replace(settings, init_adapter=start),
    )
    assert np.isfinite(out["loss"])
    first = read_jsonl(str(tmp_path / "run" / "metrics.jsonl"))[0]
    assert first["param_norm"] == pytest.approx(
        float(jnp.sqrt(sum(jnp.sum(x**2) for x in jax.tree.leaves(load_peft(start, build_model(cfg), settings))))),
        rel=1e-5,
    )


@pytest.mark.slow  # a PPO run per case (~30 s each on an idle 2-core CPU)
@pytest.mark.parametrize("value_model,quantize", [("separate", "none"), ("shared", "nf4")])
def test_lora_ppo_trains_adapters_against_the_base_as_reference(world, tmp_path, value_model, quantize):
    from rlaif_jax.train.ppo import PPOConfig, train_ppo

    target = world["tok"].convert_tokens_to_ids("cat")
    config = PPOConfig(
        rollout_batch_size=8,
        mini_batch_size=8,
        ppo_epochs=1,
        max_new_tokens=4,
        max_prompt_length=16,
        value_model=value_model,
    )
    train_ppo(
        run_dir=str(tmp_path),
        policy=world["base"],
        prompts=world["demos"],
        num_iterations=3,
        config=config,
        reward_fn=lambda tokens, pos, segs, rmask, P: ((tokens[:, P:] == target) * rmask).sum(1) / 4.0,
        optimizer=functools.partial(make_optimizer, learning_rate=1e-2),
        mesh=ONE_DEVICE,
        lora=LoraSettings(rank=4, quantize=quantize, block_size=16),
    )
    rows = read_jsonl(str(tmp_path / "metrics.jsonl"))
    # The reference is the policy with its adapters off: identical at the start (B = 0).
    assert rows[0]["objective/kl"] == 0.0 and rows[-1]["objective/kl"] != 0.0
    base = load_file(os.path.join(world["base"], "model.safetensors"))
    merged = load_file(str(tmp_path / "hf" / "model.safetensors"))
    for k, w in base.items():
        if not any(p in k for p in ("_proj.",)):
            np.testing.assert_array_equal(merged[k], w, err_msg=k)  # embeddings, norms, LM head
    assert max(float(np.abs(merged[k] - base[k]).max()) for k in base if "q_proj" in k) > 1e-3
