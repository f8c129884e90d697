"""Tiny random HF models of each family the decoder covers, saved to local directories."""

from __future__ import annotations

import numpy as np

VOCAB = 97

_LLAMA3_ROPE = {
    "rope_theta": 5e5,
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8,
}
_THETA_1E6 = {"rope_theta": 1e6, "rope_type": "default"}

# name -> (HF class name, config kwargs). Each exercises a different family feature.
FAMILIES = {
    # LLaMA-1: multi-head attention, theta 1e4.
    "llama1": ("Llama", dict(num_key_value_heads=4)),
    # Llama-2 70B style grouped-query attention.
    "llama2_gqa": ("Llama", dict(num_key_value_heads=2)),
    # Mistral: GQA plus a sliding window shorter than the test sequences.
    "mistral_window": ("Mistral", dict(num_key_value_heads=2, sliding_window=5)),
    # Yi: large rope theta, GQA.
    "yi": ("Llama", dict(num_key_value_heads=2, rope_parameters={"rope_theta": 5e6, "rope_type": "default"})),
    # DeepSeek-LLM 7B: MHA, larger vocab share, untied.
    "deepseek": ("Llama", dict(num_key_value_heads=4, rope_parameters={"rope_theta": 1e4, "rope_type": "default"})),
    "rope_linear": (
        "Llama",
        dict(num_key_value_heads=2, rope_parameters={"rope_theta": 1e4, "rope_type": "linear", "factor": 2.0}),
    ),
    "rope_llama3": (
        "Llama",
        dict(
            num_key_value_heads=1,
            rope_parameters={
                "rope_theta": 5e5,
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8,
            },
        ),
    ),
    "rope_yarn": (
        "Llama",
        dict(
            num_key_value_heads=2,
            max_position_embeddings=32,
            rope_parameters={
                "rope_theta": 1e4,
                "rope_type": "yarn",
                "factor": 4.0,
                "original_max_position_embeddings": 8,
            },
        ),
    ),
    # Dynamic NTK only changes anything past max_position_embeddings: make that short.
    "rope_dynamic": (
        "Llama",
        dict(
            num_key_value_heads=2,
            max_position_embeddings=8,
            rope_parameters={"rope_theta": 1e4, "rope_type": "dynamic", "factor": 2.0},
        ),
    ),
    "tied": ("Llama", dict(num_key_value_heads=2, tie_word_embeddings=True)),
    "biases": ("Llama", dict(num_key_value_heads=2, attention_bias=True, mlp_bias=True)),
    # Mixtral: sparse MoE, 4 experts, top-2, GQA, rope theta 1e6.
    "mixtral": ("Mixtral", dict(num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2)),
    # Llama 3.2: llama3 rope, GQA, tied embeddings, head_dim != hidden / heads.
    "llama3_2": (
        "Llama",
        dict(
            num_key_value_heads=2,
            head_dim=8,
            tie_word_embeddings=True,
            rope_parameters=_LLAMA3_ROPE,
        ),
    ),
    # Qwen2.5: q/k/v bias (no o bias), GQA, tied (the small ones), theta 1e6.
    "qwen2": ("Qwen2", dict(num_key_value_heads=2, tie_word_embeddings=True, rope_parameters=_THETA_1E6)),
    # Qwen3: per-head q/k RMSNorm, no bias, untied, explicit head_dim.
    "qwen3": ("Qwen3", dict(num_key_value_heads=2, head_dim=24, rope_parameters=_THETA_1E6)),
    # Gemma 2: GeGLU, (1 + w) pre/post norms, scaled embeddings, both soft caps (small, so the
    # tanh bends), query_pre_attn_scalar != head_dim, sliding layers (window 5) alternating
    # with global ones.
    "gemma2": (
        "Gemma2",
        dict(
            num_key_value_heads=2,
            head_dim=16,
            query_pre_attn_scalar=24,
            sliding_window=5,
            attn_logit_softcapping=3.0,
            final_logit_softcapping=2.0,
        ),
    ),
    # Gemma 3 text: q/k norms, local (1e4) and global (1e6, linear x2) RoPE bases, two
    # sliding layers then a global one (5:1 in the real models), no soft caps.
    "gemma3": (
        "Gemma3Text",
        dict(
            num_key_value_heads=2,
            head_dim=16,
            query_pre_attn_scalar=16,
            sliding_window=5,
            layer_types=["sliding_attention", "sliding_attention", "full_attention"],
            rope_parameters={
                "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6},
                "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
            },
        ),
    ),
}
# Families added for issue 36: their vector params (norm weights, biases) are randomised too,
# so a norm or bias read into the wrong place changes the logits.
MODERN = ("llama3_2", "qwen2", "qwen3", "gemma2", "gemma3")


def make_hf_model(name: str, seed: int = 0, **extra):
    import torch
    import transformers

    cls_name, kw = FAMILIES[name]
    kw = dict(kw)
    kw.update(extra)
    kw.setdefault("max_position_embeddings", 64)
    cfg_cls = getattr(transformers, f"{cls_name}Config")
    model_cls = getattr(transformers, f"{cls_name.removesuffix('Text')}ForCausalLM")
    cfg = cfg_cls(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        **kw,
    )
    torch.manual_seed(seed)
    model = model_cls(cfg).eval()
    # Random-init std 0.02 makes near-uniform logits; larger weights make the comparisons
    # sensitive to every detail (rope, masks, norms).
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 1 and p.shape[0] > 1 and p.dim() > 1:
                p.mul_(4.0)
            elif name in MODERN:
                p.add_(0.2 * torch.randn_like(p))
    return model


def save_hf_model(model, path, max_shard_size=None):
    kw = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(path, safe_serialization=True, **kw)
    return path


def random_ids(batch, length, seed=0, low=3):
    return np.random.RandomState(seed).randint(low, VOCAB, (batch, length)).astype(np.int32)
