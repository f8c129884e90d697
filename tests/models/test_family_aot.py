"""A tiny Gemma-2-shaped model (soft caps, alternating sliding / global layers) and a tiny
Qwen2-shaped one (q/k/v bias): their SFT steps compiled ahead of time for a real TPU topology (v5e 2x2 through
libtpu, from this CPU host): the splash kernel with its soft cap, a sliding and a global kernel
per layer under the scan, the params split over fsdp, and the programs fit."""

import jax
import pytest

from rlaif_jax import aot
from rlaif_jax import sharding as shd
from rlaif_jax.models import DecoderConfig
from rlaif_jax.train import SFT, make_optimizer

ROWS, LENGTH = 8, 128
BASE = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    max_position_embeddings=512,
    dtype="bfloat16",
    remat_policy="dots",
)
GEMMA2 = DecoderConfig(
    **BASE,
    model_type="gemma2",
    hidden_act="gelu_pytorch_tanh",
    head_dim=32,
    query_pre_attn_scalar=24,
    sliding_window=64,
    layer_types=("sliding_attention", "full_attention"),
    attn_logit_softcap=50.0,
    final_logit_softcap=30.0,
    tie_word_embeddings=True,
    vocab_chunk_size=128,
)
QWEN2 = DecoderConfig(**BASE, model_type="qwen2", tie_word_embeddings=True)


@pytest.mark.parametrize("cfg, objective", [(GEMMA2, SFT()), (QWEN2, SFT())], ids=["gemma2_sft", "qwen2_sft"])
def test_family_steps_compile_for_tpu(cfg, objective):
    pytest.importorskip("libtpu", reason="libtpu is not installed: pip install -e '.[test,tpu-aot]' (CI installs it)")
    target = aot.target("v5e-4")
    layout = shd.Layout(shd.make_mesh(1, -1, 1, devices=target.devices), shd.logical_rules())
    tx, schedule = make_optimizer(name="adamw", learning_rate=1e-6, clip_norm=1.0)
    batch = aot.batch_layout(objective.data_kind, ROWS, LENGTH)
    (program,) = aot.train_step_programs(type(objective).__name__.lower(), objective, cfg, tx, schedule, layout, batch)
    report, compiled = aot.compile_program(program, target)
    assert compiled is not None and report.fits and report.warnings == (), report
    hlo = compiled.as_text()
    assert "tpu_custom_call" in hlo  # splash, not the einsum fallback
    if cfg.local_layers is not None:
        # one conditional per direction (forward, and the remat'd backward) picks the layer's kernel
        assert "conditional" in hlo
    params = program.args[0].params
    embed = params["embed"]["embedding"]
    assert embed.shape == (cfg.vocab_size, cfg.hidden_size)
    (state_sh, *_), _ = compiled.input_shardings
    assert "fsdp" in str(jax.tree.leaves(state_sh.params["layers"])[0].spec) or "fsdp" in str(
        state_sh.params["embed"]["embedding"].spec
    )
    assert report.total_bytes < 1 * aot.GiB
