"""Tiny random HF models of each family the decoder covers, saved to local directories."""

from __future__ import annotations

import numpy as np

VOCAB = 97

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
}


def make_hf_model(name: str, seed: int = 0, **extra):
    import torch
    import transformers

    cls_name, kw = FAMILIES[name]
    kw = dict(kw)
    kw.update(extra)
    kw.setdefault("max_position_embeddings", 64)
    cfg_cls = getattr(transformers, f"{cls_name}Config")
    model_cls = getattr(transformers, f"{cls_name}ForCausalLM")
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
    return model


def save_hf_model(model, path, max_shard_size=None):
    kw = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(path, safe_serialization=True, **kw)
    return path


def random_ids(batch, length, seed=0, low=3):
    return np.random.RandomState(seed).randint(low, VOCAB, (batch, length)).astype(np.int32)
