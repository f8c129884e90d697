"""LoRA / QLoRA settings: one frozen dataclass per stage, off by default (rank 0)."""

from __future__ import annotations

import dataclasses
import re
from typing import Optional

import gin

from rlaif_jax.errors import ConfigError, binding, non_negative, one_of, positive, whole

# The decoder's projections an adapter can wrap (Dense module names, decoder.py).
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
QUANTIZE = ("none", "int8", "nf4")


@gin.configurable
@dataclasses.dataclass(frozen=True)
class LoraSettings:
    """rank 0: full fine-tuning (LoRA off). Per stage with gin scopes: `dpo/LoraSettings.rank = 16`.

    targets: a regex searched in each projection's module path ("layers/attn/q_proj",
      "layers_3/mlp/down_proj"); the default wraps all seven projections.
    alpha / rank (or alpha / sqrt(rank) with rslora, Kalajdzievski 2023) scales B(A x).
    dropout: on the adapter's input only (as PEFT), in training steps.
    quantize: the frozen base's targeted kernels stored as "int8" (per output channel) or
      "nf4" (blocks of `block_size`, QLoRA), dequantised in each matmul; "none": as loaded.
    init_adapter: a PEFT adapter directory (adapter_config.json + adapter_model.safetensors)
      to start from instead of a fresh adapter (B = 0).
    """

    rank: int = 0
    alpha: float = 16.0
    dropout: float = 0.0
    targets: str = r"(q|k|v|o|gate|up|down)_proj$"
    rslora: bool = False
    quantize: str = "none"
    block_size: int = 64
    init_adapter: Optional[str] = None

    def __post_init__(self):
        b = lambda p: binding(f"LoraSettings.{p}")  # noqa: E731
        whole(b("rank"), self.rank, 0, hint=">= 0; 0 is LoRA off")
        positive(b("alpha"), self.alpha)
        non_negative(b("dropout"), self.dropout)
        if self.dropout >= 1:
            raise ConfigError(f"{b('dropout')} = {self.dropout!r}: must be < 1")
        one_of(b("quantize"), self.quantize, QUANTIZE)
        whole(b("block_size"), self.block_size, 2)
        if self.block_size % 2:
            raise ConfigError(f"{b('block_size')} = {self.block_size}: must be even (two 4-bit codes a byte)")
        try:
            pat = re.compile(self.targets)
        except re.error as e:
            raise ConfigError(f"{b('targets')} = {self.targets!r} is not a regex: {e}") from None
        if self.rank and not any(pat.search(f"layers/attn/{p}") or pat.search(f"layers/mlp/{p}") for p in PROJECTIONS):
            raise ConfigError(
                f"{b('targets')} = {self.targets!r} matches none of the projections {list(PROJECTIONS)} "
                "(searched in paths like 'layers/attn/q_proj'); LoRA would train nothing"
            )
        if not self.rank and (self.quantize != "none" or self.init_adapter):
            raise ConfigError(
                f"{b('quantize')} / {b('init_adapter')} need LoRA on: set {b('rank')} > 0 (QLoRA trains adapters "
                "on a frozen quantized base)"
            )

    @property
    def enabled(self) -> bool:
        return self.rank > 0

    @property
    def scale(self) -> float:
        return self.alpha / (self.rank**0.5 if self.rslora else self.rank)

    def targets_path(self, path: str) -> bool:
        """Whether the projection at module path `path` ("layers/attn/q_proj") gets an adapter."""
        return path.rsplit("/", 1)[-1] in PROJECTIONS and re.search(self.targets, path) is not None
