"""plan: the arithmetic against closed forms, API dollars less a fixture cache's answers, and
the table for a paper arm."""

import json

import gin
import pytest

from rlaif_jax import plan
from rlaif_jax.miniature import plan_check
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


def _miniature_fixture(root):
    """A finished two-arm miniature run's files, as much of them as plan_miniature reads."""

    def put(rel, doc):
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(doc if isinstance(doc, str) else json.dumps(doc))

    cfg = {"model_type": "llama", "vocab_size": 48, "hidden_size": 32, "intermediate_size": 64}
    cfg.update(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    put("runs/base/hf/config.json", cfg)
    put("runs/base/operative_config.gin", "run_miniature.arms = ['sft_weak_10', 'dpo_weak_10']\n")
    # First logged interval: 20 steps at 0.35 s (compile inside); then 0.1 s a step.
    logs = [{"step": 20, "step_time": 0.35}] + [{"step": 20 * i, "step_time": 0.1} for i in range(2, 6)]
    put("runs/base/metrics.jsonl", "".join(json.dumps(m) + "\n" for m in logs))
    put("data/teachers/weak-teacher/demonstrations/sft/manifest.json", {"num_records": 640})
    for i in (0, 1):
        put(f"data/feedback/sft_weak_10/samples/{i}/manifest.json", {"num_records": 320})
        put(f"data/feedback/sft_weak_10/comparisons/teacher-{i}/report.json", {"pairs": 250})
    put("data/feedback/sft_weak_10/preferences/manifest.json", {"num_records": 400})
    for arm in ("sft_weak_10", "dpo_weak_10"):
        put(f"eval/{arm}/generations/manifest.json", {"num_records": 100})
        put(f"eval/{arm}/judgments/report.json", {"pairs": 80})
    stages = {"samples": 4.0, "critic": 1.0, "preferences": 0.1, "dpo": 9.0, "evaluate": 1.0}
    put("arms/dpo_weak_10/status.json", {"stages": {k: {"seconds": v} for k, v in stages.items()}})
    put("arms/sft_weak_10/status.json", {"stages": {"sft": {"seconds": 8.0}, "evaluate": {"seconds": 3.0}}})


def test_plan_predicts_a_miniature_run_from_one_number_per_program_kind(tmp_path):
    _miniature_fixture(tmp_path)
    run = str(tmp_path)
    cal = plan_check.miniature_calibration(run, samples_arm="dpo_weak_10", critic_arm="dpo_weak_10")
    assert cal.compile_seconds == pytest.approx(20 * 0.25)
    assert cal.request_seconds == pytest.approx(1.0 / 500)
    cfg = DecoderConfig.from_hf(json.loads((tmp_path / "runs/base/hf/config.json").read_text()))
    rate = plan.training_flops(cfg, 32, 64, "sft") / 0.1  # the base's steady FLOP/s
    assert cal.mfu * plan.CPU_2CORE.peak_tflops * 1e12 == pytest.approx(rate)
    rows = {(arm, p.stage): p for arm, p in plan_check.plan_miniature(run, cal)}
    # SFT: 640 examples x 10 epochs of 40 tokens at the base's rate, plus its program's compile.
    sft = rows["sft_weak_10", "sft"]
    assert sft.seconds == pytest.approx(plan.training_flops(cfg, 6400, 40, "sft") / rate + cal.compile_seconds)
    # DPO: 400 pairs x 4 epochs in whole batches of 32, two sequences each, a reference forward.
    dpo = rows["dpo_weak_10", "dpo"]
    assert dpo.seconds == pytest.approx(plan.training_flops(cfg, 2 * 1600, 40, "dpo") / rate + cal.compile_seconds)
    # The samples stage the sampler was calibrated on comes back as measured (plus its compile).
    assert rows["dpo_weak_10", "samples"].seconds == pytest.approx(4.0 + cal.compile_seconds)
    assert rows["dpo_weak_10", "critic"].seconds == pytest.approx(1.0)
    assert rows["dpo_weak_10", "sft"].note == "reused"
    # The second evaluation compiles nothing new: 4 batches of decode steps where the samples
    # had 20 (the sampler's decode streams the weights per batch), and 80 judge requests.
    ev = rows["dpo_weak_10", "evaluate"]
    assert ev.seconds == pytest.approx(4.0 * 4 / 20 + 80 * cal.request_seconds)
    table = plan_check.miniature_table(run, cal)
    assert "| dpo_weak_10 | dpo |" in table and "| sft_weak_10 | sft |" in table
