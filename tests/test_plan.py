"""plan: the arithmetic against closed forms, API dollars less a fixture cache's answers, and
the table for a paper arm."""

import json

import gin
import pytest

from rlaif_jax import plan
from rlaif_jax.models import DecoderConfig

CFG = DecoderConfig(vocab_size=100, hidden_size=16, intermediate_size=32, num_layers=2, num_heads=4, num_kv_heads=2)


def test_training_flops_are_six_n_plus_causal_attention():
    # N without embeddings: per layer attention 16*4*(4*2+2*2) + mlp 3*16*32 + 2 norms of 16; final norm; lm head.
    per_layer = 16 * 4 * (2 * 4 + 2 * 2) + 3 * 16 * 32 + 2 * 16
    n = 2 * per_layer + 16 + 100 * 16
    seq = 64
    attn = 12 * 2 * 4 * 4 * seq / 2
    assert CFG.num_params(include_embeddings=False) + 100 * 16 == n
    assert plan.training_flops(CFG, 10, seq, "sft") == pytest.approx(10 * seq * (6 * n + attn))
    assert plan.training_flops(CFG, 10, seq, "dpo") == pytest.approx(10 * seq * (6 * n + attn) * 4 / 3)


def test_roofline_takes_the_slower_of_compute_and_memory():
    sl = plan.Slice("x-2", plan.Chip("x", 100.0, 1000.0, 2.0), chips=2, chips_per_host=2)
    eff = plan.Efficiency(mfu=0.5, hbm_efficiency=0.5)
    assert plan.roofline_seconds(1e15, 0.0, sl, eff) == pytest.approx(1e15 / (2 * 100e12 * 0.5))
    assert plan.roofline_seconds(1e9, 1e12, sl, eff) == pytest.approx(1e12 / (2 * 1000e9 * 0.5))
    assert plan.parse_slice("v4-32").chips == 16 and plan.parse_slice("v5e-16").chips == 16


def test_api_cost_excludes_cached_answers(tmp_path):
    cache = tmp_path / "critic.jsonl"
    lines = [
        {"key": "a", "status": "ok"},
        {"key": "b", "status": "error"},
        {"key": "c", "status": "error"},
        {"key": "c", "status": "ok"},  # retried: later lines win
        {"key": "d", "status": "ok"},
    ]
    cache.write_text("".join(json.dumps(x) + "\n" for x in lines) + '{"key": "torn')
    assert plan.cached_answers(str(cache)) == 3
    p = plan.api_cost("critic", "gpt-4-0314", 10, 1000, 2, plan.cached_answers(str(cache)))
    assert (p.api_requests, p.api_cached) == (7, 3)
    assert p.api_usd == pytest.approx(7 * (1000 * 30.0 + 2 * 60.0) / 1e6)
    assert plan.api_cost("judge", "no-such-model", 5, 10, 1, 0).api_usd is None  # unpriced, never free


def test_plan_prints_every_stage_of_a_paper_arm(capsys):
    try:
        rc = plan.main(
            [
                "--gin_file=configs/models/tiny_llama.gin",
                "--gin_param=HF_DIR='unused'",
                "--gin_file=configs/experiments/paper/arms/dpo_gpt4_on_sft_gpt35_10pct.gin",
                "--slice=v5e-16",
                "--mfu=0.4",
            ]
        )
    finally:
        gin.clear_config()
    out = capsys.readouterr().out
    assert rc == 0
    for stage in ("sft", "samples", "critic", "dpo", "evaluate", "judge", "total"):
        assert f"\n{stage} " in out
    assert "mfu 40%" in out and "gpt-4-0314" in out
