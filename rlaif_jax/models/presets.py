"""Named model shapes for benchmarks and smoke runs (random weights), and the benchmarks'
timing helper."""

import time

import numpy as np

from rlaif_jax.models.config import DecoderConfig

_GEMMA2 = dict(
    model_type="gemma2",
    hidden_act="gelu_pytorch_tanh",
    attn_logit_softcap=50.0,
    final_logit_softcap=30.0,
    tie_word_embeddings=True,
)
_LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}

PRESETS = {
    # ~7M params: seconds per step on a 2-core laptop.
    "tiny": dict(vocab_size=8000, hidden_size=256, intermediate_size=688, num_layers=4, num_heads=8, num_kv_heads=4),
    # ~110M params, Llama-2 shape scaled down.
    "small": dict(
        vocab_size=32000, hidden_size=768, intermediate_size=2048, num_layers=12, num_heads=12, num_kv_heads=4
    ),
    # ~1.1B params: TinyLlama-1.1B's shape (Llama-2 architecture, GQA 32/4), the device check's model.
    "llama-1b": dict(
        vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_layers=22, num_heads=32, num_kv_heads=4
    ),
    "llama2-7b": dict(
        vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_layers=32, num_heads=32, num_kv_heads=32
    ),
    # Mixtral-shaped sparse MoE (8 experts, top-2) at the tiny / small dense shapes: ~22M /
    # ~0.5B params, ~9M / ~0.18B active per token.
    "tiny-moe": dict(
        vocab_size=8000,
        hidden_size=256,
        intermediate_size=688,
        num_layers=4,
        num_heads=8,
        num_kv_heads=4,
        model_type="mixtral",
        num_experts=8,
        num_experts_per_tok=2,
    ),
    "small-moe": dict(
        vocab_size=32000,
        hidden_size=768,
        intermediate_size=2048,
        num_layers=12,
        num_heads=12,
        num_kv_heads=4,
        model_type="mixtral",
        num_experts=8,
        num_experts_per_tok=2,
    ),
    # Tiny shapes of the issue-36 families (random weights; CPU tests and the AOT CI check).
    "tiny-gemma2": dict(
        _GEMMA2,
        vocab_size=8000,
        hidden_size=256,
        intermediate_size=512,
        num_layers=4,
        num_heads=4,
        num_kv_heads=2,
        head_dim=64,
        query_pre_attn_scalar=64,
        sliding_window=64,
        layer_types=("sliding_attention", "full_attention") * 2,
    ),
    "tiny-qwen3": dict(
        model_type="qwen3",
        vocab_size=8000,
        hidden_size=256,
        intermediate_size=688,
        num_layers=4,
        num_heads=8,
        num_kv_heads=4,
        head_dim=64,
        rope_theta=1e6,
    ),
    # Full sizes (the shapes of configs/models/<name>.gin, for benchmark_model.py).
    "llama3.1-8b": dict(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_layers=32,
        num_heads=32,
        num_kv_heads=8,
        rope_theta=5e5,
        rope_scaling=_LLAMA3_ROPE,
    ),
    "qwen2.5-7b": dict(
        model_type="qwen2",
        vocab_size=152064,
        hidden_size=3584,
        intermediate_size=18944,
        num_layers=28,
        num_heads=28,
        num_kv_heads=4,
        rope_theta=1e6,
    ),
    "qwen3-8b": dict(
        model_type="qwen3",
        vocab_size=151936,
        hidden_size=4096,
        intermediate_size=12288,
        num_layers=36,
        num_heads=32,
        num_kv_heads=8,
        head_dim=128,
        rope_theta=1e6,
    ),
    "gemma2-9b": dict(
        _GEMMA2,
        vocab_size=256000,
        hidden_size=3584,
        intermediate_size=14336,
        num_layers=42,
        num_heads=16,
        num_kv_heads=8,
        head_dim=256,
        query_pre_attn_scalar=256,
        sliding_window=4096,
        layer_types=("sliding_attention", "full_attention") * 21,
    ),
}


def preset_config(name: str, **overrides):

    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
    return DecoderConfig(**{"max_position_embeddings": 4096, **PRESETS[name], **overrides})


def median_seconds(fn, repeats: int, warmup: int = 2) -> float:
    """Median wall time of fn() over `repeats` calls, after `warmup` calls. Two warm-up calls:
    a step fed its own donated output can compile a second time (committed inputs)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times))
