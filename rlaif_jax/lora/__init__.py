"""LoRA and QLoRA for every trainer (see docs/lora.md)."""

from rlaif_jax.lora.adapters import (  # noqa: F401
    LORA_A,
    LORA_B,
    LoraModel,
    abstract_adapters,
    dequantize_base,
    init_adapters,
    is_adapter,
    merge,
    merged_weights,
    quantize_base,
    select,
)
from rlaif_jax.lora.settings import PROJECTIONS, LoraSettings  # noqa: F401
