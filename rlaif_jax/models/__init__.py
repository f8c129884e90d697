"""Llama-style decoders (LLaMA-1, Llama-2, Mistral, Yi, DeepSeek-LLM) and the Mixtral sparse
mixture of experts, HF import/export."""

from rlaif_jax.models.config import DecoderConfig, custom_model_config, model_config
from rlaif_jax.models.decoder import Transformer
from rlaif_jax.models.kv_cache import init_cache
from rlaif_jax.models.params import (
    abstract_params,
    apply,
    build_model,
    check_placement,
    gather_last,
    init_params,
    last_token_index,
    param_shardings,
)

__all__ = [
    "DecoderConfig",
    "Transformer",
    "abstract_params",
    "apply",
    "build_model",
    "check_placement",
    "custom_model_config",
    "gather_last",
    "init_cache",
    "init_params",
    "last_token_index",
    "model_config",
    "param_shardings",
]
