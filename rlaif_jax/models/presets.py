"""Named model shapes for benchmarks and smoke runs (random weights), and the benchmarks'
timing helper."""

import time

import numpy as np

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
}


def preset_config(name: str, **overrides):
    from rlaif_jax.models.config import DecoderConfig

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
