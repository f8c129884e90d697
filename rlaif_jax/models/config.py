"""Decoder configuration shared by the Llama-style families (LLaMA-1/2/3, Mistral, Yi,
DeepSeek-LLM), the sparse mixture-of-experts Mixtral, Qwen2/2.5, Qwen3, Gemma 2 and Gemma 3
(text), built from a Hugging Face ``config.json`` or from gin. Family features that are fixed
by the architecture (Gemma's (1 + w) norms, Qwen3's q/k norms...) follow from `model_type`;
the ones a checkpoint sets (soft caps, window layout) are fields. docs/models.md."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Optional

import gin
import jax.numpy as jnp

from rlaif_jax import errors

# HF model types whose weights and maths are the same Llama-style decoder (mixtral: with a
# sparse mixture-of-experts block in place of the MLP).
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma2", "gemma3_text")
GEMMA_TYPES = ("gemma2", "gemma3_text")
# HF hidden_act / hidden_activation values the MLP implements (GELU: the tanh approximation).
SUPPORTED_ACTS = ("silu", "gelu_pytorch_tanh")
LAYER_TYPES = ("full_attention", "sliding_attention")
MOE_IMPLS = ("ragged", "dense")
# Attention kernels (see DecoderConfig.attention_impl and docs/model_api.md).
ATTENTION_IMPLS = ("auto", "einsum", "xla", "cudnn", "splash", "blocked")
KV_ROW_WRITES = ("auto", "scatter", "select")
SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn")

_DTYPES = {
    "float32": jnp.float32,
    "fp32": jnp.float32,
    "bfloat16": jnp.bfloat16,
    "bf16": jnp.bfloat16,
    "float16": jnp.float16,
    "fp16": jnp.float16,
}


def resolve_dtype(dtype: Any):
    """Accepts a jnp dtype or its name (gin files hold names)."""
    if isinstance(dtype, str):
        try:
            return _DTYPES[dtype]
        except KeyError:
            raise ValueError(f"unknown dtype {dtype!r}; expected one of {sorted(_DTYPES)}") from None
    return jnp.dtype(dtype).type


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: Optional[int] = None
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    # HF-style rope scaling dict, e.g. {"rope_type": "linear", "factor": 2.0}; None = plain RoPE.
    rope_scaling: Optional[tuple] = None
    max_position_embeddings: int = 4096
    sliding_window: Optional[int] = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    bos_token_id: Optional[int] = 1
    eos_token_id: Any = 2
    pad_token_id: Optional[int] = None
    model_type: str = "llama"
    # MLP activation: "silu" (SwiGLU) or "gelu_pytorch_tanh" (Gemma's GeGLU).
    hidden_act: str = "silu"
    # Attention scores are scaled by query_pre_attn_scalar ** -0.5 (Gemma) instead of
    # head_dim ** -0.5 when set.
    query_pre_attn_scalar: Optional[float] = None
    # tanh soft caps (Gemma 2): scores -> cap * tanh(scores / cap) before the mask and
    # softmax, and the LM head's logits likewise (in float32). None = no cap.
    attn_logit_softcap: Optional[float] = None
    final_logit_softcap: Optional[float] = None
    # Per layer "sliding_attention" (sliding_window) or "full_attention" (Gemma 2 alternates,
    # Gemma 3 five local to one global); None = every layer as `sliding_window` says.
    layer_types: Optional[tuple] = None
    # Gemma 3: the RoPE base of the sliding layers (plain RoPE); rope_theta / rope_scaling
    # are the global layers'.
    rope_local_theta: Optional[float] = None
    # Numerics: params are stored in param_dtype, matmuls run in dtype; norms, softmax and
    # logits stay in float32 because bf16 there costs accuracy and saves almost nothing.
    dtype: str = "float32"
    param_dtype: str = "float32"
    # Per-layer rematerialization: "none", "full" (recompute the whole block) or
    # "dots" (save matmul outputs without a batch dim, recompute the rest).
    remat_policy: str = "none"
    # Scan over layers: one compiled layer body instead of num_layers copies. Compile time
    # for 32-80 layer models is what makes this worth the stacked param layout.
    scan_layers: bool = True
    initializer_range: float = 0.02
    # Sparse mixture of experts (Mixtral): 0 = a dense SwiGLU MLP (every other MoE field is
    # then ignored). HF's num_local_experts.
    num_experts: int = 0
    num_experts_per_tok: int = 2
    # Training only: the MoE input is multiplied by U(1 - j, 1 + j) noise when the model is
    # applied with an rng stream named "router" (the objectives pass one while training).
    router_jitter_noise: float = 0.0
    router_aux_loss_coef: float = 0.001
    # As in HF: when true the model also returns the router load-balancing loss
    # ("moe_aux_loss") and the objectives add router_aux_loss_coef times it to their loss.
    output_router_logits: bool = False
    # "ragged": tokens sorted by expert, only the selected experts computed
    # (jax.lax.ragged_dot: a grouped matmul on TPU/GPU); "dense": every expert on every
    # token, weighted by a gate that is zero off the top-k (the reference; cheaper on CPU,
    # where XLA emulates ragged_dot densely).
    moe_impl: str = "ragged"
    # Attention kernel for the full-sequence (no KV cache) forward: "einsum" (the reference:
    # a materialised [B, H, T, T] float32 score tensor), "xla" (jax.nn.dot_product_attention
    # with implementation="xla" and the exact boolean mask), "cudnn" (cuDNN flash attention,
    # NVIDIA GPU, bf16/fp16 only), "splash" (the Pallas splash-attention kernel, TPU only),
    # "blocked" (models/blocked_attention.py: causal query blocks with an online softmax, for
    # the CPU) or "auto" (cudnn on an NVIDIA GPU in bf16/fp16, splash on TPU, blocked on CPU
    # from decoder.BLOCKED_MIN_LENGTH tokens, else einsum). Decoding with
    # a KV cache always uses einsum. A runtime choice: never written to an HF config.json.
    attention_impl: str = "auto"
    # Training log-probs by vocabulary chunks of this many ids (train.vocab_chunks): the
    # objectives read the final hidden states and never build the [batch, length, vocab]
    # float32 logits, in the forward or the backward pass. 0 = the full logits (exact
    # numerics of the tiny and miniature models). Sampling and scoring outside training
    # still use full logits. A runtime choice: never written to an HF config.json.
    vocab_chunk_size: int = 0
    # One-token decode steps read the KV cache in blocks of this many slots (online softmax)
    # and stop at the last filled block, so a step costs the filled length, not the cache's;
    # 0 reads the whole cache in one einsum. Caches of at most this many slots are read
    # whole either way. A runtime choice, like attention_impl.
    decode_block: int = 256
    # How a decode step with one cache index per row (continuous batching) writes each row's
    # new key: "scatter" (B entries in place; XLA CPU / GPU), "select" (a where over the whole
    # cache, no scatter, which TPUs run slowly) or "auto" (select on TPU, else scatter). The
    # same values either way. A runtime choice, like attention_impl.
    kv_row_write: str = "auto"

    def __post_init__(self):
        if self.head_dim is None:
            if self.hidden_size % self.num_heads:
                raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} must be a multiple of num_kv_heads {self.num_kv_heads}")
        if isinstance(self.rope_scaling, dict):
            object.__setattr__(self, "rope_scaling", tuple(sorted(self.rope_scaling.items())))
        if self.layer_types is not None:
            object.__setattr__(self, "layer_types", tuple(self.layer_types))
        self._check_family()
        rope_type = self.rope_type
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ValueError(f"rope type {rope_type!r} is not supported; supported: {SUPPORTED_ROPE_TYPES}")
        if self.remat_policy not in ("none", "full", "dots"):
            raise ValueError(f"remat_policy must be none|full|dots, got {self.remat_policy!r}")
        resolve_dtype(self.dtype)
        resolve_dtype(self.param_dtype)
        errors.one_of("DecoderConfig.attention_impl", self.attention_impl, ATTENTION_IMPLS)
        errors.whole(
            "DecoderConfig.vocab_chunk_size", self.vocab_chunk_size, 0, "0 for full logits, else ids per chunk"
        )
        errors.whole("DecoderConfig.decode_block", self.decode_block, 0, "0 reads the whole cache; e.g. 256")
        errors.one_of("DecoderConfig.kv_row_write", self.kv_row_write, KV_ROW_WRITES)
        if self.attention_impl == "cudnn":
            if resolve_dtype(self.dtype) not in (jnp.bfloat16, jnp.float16):
                raise errors.ConfigError(
                    f"DecoderConfig.attention_impl = 'cudnn' needs dtype bfloat16 or float16 "
                    f"(cuDNN flash attention has no float32 kernel), got dtype={self.dtype!r}; "
                    "set the dtype or use attention_impl 'auto' / 'xla' / 'einsum'"
                )
            if self.head_dim % 8 or self.head_dim > 256:
                raise errors.ConfigError(
                    f"DecoderConfig.attention_impl = 'cudnn' needs head_dim a multiple of 8 and "
                    f"<= 256, got {self.head_dim}; use attention_impl 'xla' or 'einsum'"
                )
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"model_type {self.model_type!r} is not one of {SUPPORTED_MODEL_TYPES}")
        if (self.model_type == "mixtral") != (self.num_experts > 0):
            raise ValueError(
                f"model_type {self.model_type!r} with num_experts={self.num_experts}: a sparse MoE "
                "model is model_type='mixtral' with num_experts > 0, and only it"
            )
        if self.is_moe:
            if not 1 <= self.num_experts_per_tok <= self.num_experts:
                raise ValueError(
                    f"num_experts_per_tok must be in [1, num_experts={self.num_experts}], "
                    f"got {self.num_experts_per_tok}"
                )
            if self.moe_impl not in MOE_IMPLS:
                raise ValueError(f"moe_impl must be one of {MOE_IMPLS}, got {self.moe_impl!r}")
            if self.mlp_bias:
                raise ValueError("mlp_bias is not supported with experts (Mixtral has none)")
            if not 0 <= self.router_jitter_noise < 1:
                raise ValueError(f"router_jitter_noise must be in [0, 1), got {self.router_jitter_noise}")

    def _check_family(self):
        errors.one_of("DecoderConfig.hidden_act", self.hidden_act, SUPPORTED_ACTS)
        if self.layer_types is not None:
            for t in self.layer_types:
                errors.one_of("DecoderConfig.layer_types", t, LAYER_TYPES)
            if len(self.layer_types) != self.num_layers:
                raise errors.ConfigError(
                    f"DecoderConfig.layer_types has {len(self.layer_types)} entries for num_layers={self.num_layers}"
                )
            if "sliding_attention" in self.layer_types and not self.sliding_window:
                raise errors.ConfigError("DecoderConfig.layer_types has sliding layers but sliding_window is not set")
        if self.rope_local_theta is not None and self.local_layers is None:
            raise errors.ConfigError(
                "DecoderConfig.rope_local_theta needs layer_types with both sliding and full layers"
            )
        for name in ("attn_logit_softcap", "final_logit_softcap", "query_pre_attn_scalar"):
            v = getattr(self, name)
            if v is not None and not v > 0:
                raise errors.ConfigError(f"DecoderConfig.{name} must be > 0 or None, got {v!r}")
        if self.mlp_bias and self.model_type not in ("llama", "mistral"):
            raise errors.ConfigError(f"DecoderConfig.mlp_bias: model_type {self.model_type!r} has no MLP bias")

    # -- derived ---------------------------------------------------------------------------
    @property
    def is_gemma(self) -> bool:
        """Gemma's RMSNorm scales by (1 + w) (w stored zero-centred), a norm before and after
        both attention and MLP, and embeddings times sqrt(hidden_size)."""
        return self.model_type in GEMMA_TYPES

    @property
    def qk_norm(self) -> bool:
        """Qwen3 and Gemma 3: an RMSNorm over head_dim on each query and key head, before RoPE."""
        return self.model_type in ("qwen3", "gemma3_text")

    @property
    def qkv_bias(self) -> bool:
        """Bias on the q/k/v projections: Qwen2 always (its o_proj has none), else attention_bias."""
        return self.attention_bias or self.model_type == "qwen2"

    @property
    def attention_scale(self) -> float:
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

    @property
    def local_layers(self) -> Optional[tuple]:
        """Per layer True for sliding-window layers, when layers differ; None when every layer
        attends alike (then `uniform_window` is their window)."""
        if self.layer_types is None or len(set(self.layer_types)) == 1:
            return None
        return tuple(t == "sliding_attention" for t in self.layer_types)

    @property
    def uniform_window(self) -> Optional[int]:
        """The sliding window of every layer when all layers are alike (None: full attention
        everywhere or layers differ)."""
        if self.layer_types is None:
            return self.sliding_window or None
        if set(self.layer_types) == {"sliding_attention"}:
            return self.sliding_window
        return None

    @property
    def rope_scaling_dict(self) -> dict:
        return dict(self.rope_scaling or ())

    @property
    def rope_type(self) -> str:
        d = self.rope_scaling_dict
        return d.get("rope_type", d.get("type", "default")) or "default"

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def compute_dtype(self):
        return resolve_dtype(self.dtype)

    @property
    def params_dtype(self):
        return resolve_dtype(self.param_dtype)

    @property
    def eos_token_ids(self) -> tuple:
        e = self.eos_token_id
        if e is None:
            return ()
        return tuple(e) if isinstance(e, (list, tuple)) else (int(e),)

    def replace(self, **kw) -> "DecoderConfig":
        return dataclasses.replace(self, **kw)

    def num_params(self, include_embeddings: bool = True, active: bool = False) -> int:
        """Parameter count; `active`: only the experts one token runs through (MoE)."""
        h, f, d = self.hidden_size, self.intermediate_size, self.head_dim
        attn = h * d * (self.num_heads * 2 + self.num_kv_heads * 2)
        if self.qkv_bias:
            attn += d * (self.num_heads + 2 * self.num_kv_heads)
        if self.attention_bias:
            attn += h
        if self.qk_norm:
            attn += 2 * d
        mlp = 3 * h * f + (2 * f + h if self.mlp_bias else 0)
        if self.is_moe:
            mlp = mlp * (self.num_experts_per_tok if active else self.num_experts) + h * self.num_experts
        per_layer = attn + mlp + (4 if self.is_gemma else 2) * h
        total = self.num_layers * per_layer + h
        if include_embeddings:
            total += self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return total

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward, 6N plus attention), as MaxText counts;
        N counts only the experts a token is routed to."""
        n = self.num_params(include_embeddings=False, active=True) + self.vocab_size * self.hidden_size
        attn = 12 * self.num_layers * self.num_heads * self.head_dim * seq_len / 2  # causal half
        return 6 * n + attn

    # -- Hugging Face interop --------------------------------------------------------------
    @classmethod
    def from_hf(cls, hf_config, **overrides) -> "DecoderConfig":
        """From a transformers config object (Llama / Mistral / Mixtral / Qwen2 / Qwen3 /
        Gemma2 / Gemma3Text config, or a multimodal Gemma3Config: its text model) or its
        dict. A field the decoder does not implement is a
        ConfigError naming it: never a silently different model."""
        d = hf_config.to_dict() if hasattr(hf_config, "to_dict") else dict(hf_config)
        model_type = d.get("model_type", "llama")
        if model_type == "gemma3":
            d = gemma3_text_config(d)
            model_type = d["model_type"]
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise errors.ConfigError(
                f"config.json model_type {model_type!r} is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        gemma = model_type in GEMMA_TYPES
        act_field = "hidden_activation" if gemma and d.get("hidden_activation") else "hidden_act"
        act = d.get(act_field) or "silu"
        if act not in SUPPORTED_ACTS:
            raise errors.ConfigError(
                f"config.json {act_field} = {act!r} is not implemented; supported: {', '.join(SUPPORTED_ACTS)}"
            )
        if d.get("use_bidirectional_attention"):
            raise errors.ConfigError("config.json use_bidirectional_attention = true is not implemented (causal only)")
        for field in ("attention_chunk_size", "no_rope_layers", "moe_intermediate_size"):
            if d.get(field):
                raise errors.ConfigError(f"config.json {field} = {d[field]!r} is not implemented")
        # transformers >= 5 folds theta and scaling into rope_parameters (Gemma 3: one dict per
        # layer type); older configs keep rope_theta and rope_scaling apart.
        rope_all = dict(d.get("rope_parameters") or {})
        local_theta = None
        if "full_attention" in rope_all:
            local = dict(rope_all.get("sliding_attention") or {})
            if local.get("rope_type", "default") != "default":
                raise errors.ConfigError(
                    f"config.json rope_parameters.sliding_attention.rope_type = {local['rope_type']!r} is not "
                    "implemented (sliding layers: plain RoPE)"
                )
            local_theta = local.get("rope_theta")
            rope_all = dict(rope_all["full_attention"] or {})
        rope = rope_all
        theta = rope.pop("rope_theta", d.get("rope_theta", 10000.0))
        if not rope and d.get("rope_scaling"):
            rope = dict(d["rope_scaling"])
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise errors.ConfigError(
                f"config.json rope_parameters.rope_type = {rope_type!r} is not implemented; "
                f"supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
            )
        rope_scaling = None if rope_type in (None, "default") else rope
        window = d.get("sliding_window") if model_type != "llama" else None
        if d.get("use_sliding_window") is False:
            window = None
        layer_types = d.get("layer_types")
        if layer_types is not None:
            bad = sorted(set(layer_types) - set(LAYER_TYPES))
            if bad:
                raise errors.ConfigError(f"config.json layer_types has {bad}: only {', '.join(LAYER_TYPES)}")
            kinds = set(layer_types)
            if kinds == {"full_attention"} or not window:
                layer_types, window = None, None
            elif kinds == {"sliding_attention"}:
                layer_types = None
            else:
                layer_types = tuple(layer_types)
        if layer_types is None:
            local_theta = None  # one kind of layer: the global rope is every layer's
        kw = dict(
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_layers=d["num_hidden_layers"],
            num_heads=d["num_attention_heads"],
            num_kv_heads=d.get("num_key_value_heads") or d["num_attention_heads"],
            head_dim=d.get("head_dim") or None,
            rms_norm_eps=d.get("rms_norm_eps", 1e-6),
            rope_theta=float(theta),
            rope_scaling=rope_scaling,
            max_position_embeddings=d.get("max_position_embeddings", 4096),
            sliding_window=window,
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            attention_bias=bool(d.get("attention_bias", False)),
            mlp_bias=bool(d.get("mlp_bias", False)),
            bos_token_id=d.get("bos_token_id"),
            eos_token_id=d.get("eos_token_id"),
            pad_token_id=d.get("pad_token_id"),
            model_type=model_type,
            hidden_act=act,
            layer_types=layer_types,
            rope_local_theta=None if local_theta is None else float(local_theta),
            initializer_range=d.get("initializer_range", 0.02),
        )
        if gemma:
            kw.update(
                query_pre_attn_scalar=d.get("query_pre_attn_scalar"),
                attn_logit_softcap=d.get("attn_logit_softcapping"),
                final_logit_softcap=d.get("final_logit_softcapping"),
            )
        if model_type == "mixtral":
            # transformers 4.x and 5.x both write num_local_experts (5.x maps num_experts to it).
            kw.update(
                num_experts=int(d.get("num_local_experts") or d.get("num_experts") or 8),
                num_experts_per_tok=int(d.get("num_experts_per_tok") or 2),
                router_jitter_noise=float(d.get("router_jitter_noise") or 0.0),
                router_aux_loss_coef=float(_get(d, "router_aux_loss_coef", 0.001)),
                output_router_logits=bool(d.get("output_router_logits") or False),
            )
        kw.update(overrides)
        return cls(**kw)

    @classmethod
    def from_pretrained(cls, path: str, **overrides) -> "DecoderConfig":
        cfg_file = os.path.join(path, "config.json")
        try:
            with open(cfg_file) as f:
                d = json.load(f)
        except FileNotFoundError:
            raise FileNotFoundError(f"no config.json in HF model directory {path!r}") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{cfg_file} is not valid JSON: {e}") from None
        # Let transformers normalise legacy fields (rope_scaling "type", defaults).
        import transformers

        hf = transformers.AutoConfig.for_model(**d)
        return cls.from_hf(hf, **overrides)

    def to_hf(self):
        """The equivalent transformers config object."""
        import transformers

        rope = {"rope_type": "default"} if not self.rope_scaling else dict(self.rope_scaling_dict)
        kw = dict(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            rms_norm_eps=self.rms_norm_eps,
            max_position_embeddings=self.max_position_embeddings,
            tie_word_embeddings=self.tie_word_embeddings,
            bos_token_id=self.bos_token_id,
            eos_token_id=self.eos_token_id,
            pad_token_id=self.pad_token_id,
            hidden_act=self.hidden_act,
            initializer_range=self.initializer_range,
        )
        _set_hf_rope(kw, self.rope_theta, rope)
        layer_types = list(self.layer_types) if self.layer_types else None
        if self.model_type in ("qwen2", "qwen3", "gemma2", "gemma3_text"):
            if layer_types is None:
                kind = "sliding_attention" if self.sliding_window else "full_attention"
                layer_types = [kind] * self.num_layers
            if self.model_type == "qwen2" and self.attention_bias:
                raise ValueError("attention_bias (an o_proj bias) cannot be exported as a Qwen2 checkpoint")
        if self.model_type == "mixtral":
            if self.attention_bias:
                raise ValueError("attention_bias cannot be exported as a Mixtral checkpoint")
            cfg = transformers.MixtralConfig(
                sliding_window=self.sliding_window,
                num_local_experts=self.num_experts,
                num_experts_per_tok=self.num_experts_per_tok,
                router_jitter_noise=self.router_jitter_noise,
                router_aux_loss_coef=self.router_aux_loss_coef,
                output_router_logits=self.output_router_logits,
                **kw,
            )
            cfg.architectures = ["MixtralForCausalLM"]
        elif self.model_type == "mistral":
            cfg = transformers.MistralConfig(sliding_window=self.sliding_window, **kw)
            cfg.architectures = ["MistralForCausalLM"]
        elif self.model_type in ("qwen2", "qwen3"):
            cls = transformers.Qwen2Config if self.model_type == "qwen2" else transformers.Qwen3Config
            extra = {} if self.model_type == "qwen2" else {"attention_bias": self.attention_bias}
            sliding = "sliding_attention" in layer_types
            cfg = cls(
                use_sliding_window=sliding,
                sliding_window=self.sliding_window if sliding else None,
                layer_types=layer_types,
                **extra,
                **kw,
            )
            cfg.architectures = ["Qwen2ForCausalLM" if self.model_type == "qwen2" else "Qwen3ForCausalLM"]
        elif self.is_gemma:
            kw.pop("hidden_act")
            gemma_kw = dict(
                hidden_activation=self.hidden_act,
                query_pre_attn_scalar=_int_if_whole(self.query_pre_attn_scalar or self.head_dim),
                sliding_window=self.sliding_window,
                layer_types=layer_types,
                attn_logit_softcapping=self.attn_logit_softcap,
                final_logit_softcapping=self.final_logit_softcap,
                attention_bias=self.attention_bias,
            )
            if self.model_type == "gemma2":
                cfg = transformers.Gemma2Config(**gemma_kw, **kw)
                cfg.architectures = ["Gemma2ForCausalLM"]
            else:
                kw.pop("rope_parameters", None)
                kw.pop("rope_theta", None)
                kw.pop("rope_scaling", None)
                local = self.rope_local_theta if self.rope_local_theta is not None else self.rope_theta
                cfg = transformers.Gemma3TextConfig(
                    rope_parameters={
                        "full_attention": {"rope_theta": self.rope_theta, **rope},
                        "sliding_attention": {"rope_theta": local, "rope_type": "default"},
                    },
                    **gemma_kw,
                    **kw,
                )
                cfg.architectures = ["Gemma3ForCausalLM"]
        else:
            if self.sliding_window:
                raise ValueError("sliding_window needs model_type='mistral' to export to HF")
            cfg = transformers.LlamaConfig(attention_bias=self.attention_bias, mlp_bias=self.mlp_bias, **kw)
            cfg.architectures = ["LlamaForCausalLM"]
        return cfg


def _int_if_whole(x):
    """transformers' Gemma configs type query_pre_attn_scalar as an int."""
    return int(x) if float(x).is_integer() else x


def _get(d: dict, key: str, default):
    """d[key], or default when it is absent or null."""
    v = d.get(key)
    return default if v is None else v


def _set_hf_rope(kw: dict, theta: float, rope: dict) -> None:
    import transformers

    major = int(transformers.__version__.split(".")[0])
    if major >= 5:
        kw["rope_parameters"] = {"rope_theta": theta, **rope}
    else:
        kw["rope_theta"] = theta
        kw["rope_scaling"] = None if rope.get("rope_type") == "default" else rope


# DecoderConfig fields that say how a model computes, not what it is: an HF export's
# config.json carries none of them, so a model loaded from one (train_ppo's policy and
# reward model) runs with DecoderConfig's defaults (float32, no remat) unless given them.
NUMERICS_FIELDS = (
    "dtype",
    "param_dtype",
    "remat_policy",
    "scan_layers",
    "attention_impl",
    "vocab_chunk_size",
    "decode_block",
    "kv_row_write",
)


def numerics_overrides(name: str, numerics: Optional[Any]) -> dict:
    """`numerics` ({field: value} of NUMERICS_FIELDS, or None) as DecoderConfig overrides,
    checked: an architecture field there would silently reshape a pretrained model.

    Args:
      name: the binding it came from (for the error).
      numerics: the mapping, or None for none.
    Returns:
      A plain dict (DecoderConfig checks the values when built).
    """
    if numerics is None:
        return {}
    if not hasattr(numerics, "items"):
        raise errors.ConfigError(f"{name} = {numerics!r}: must be a dict of {', '.join(NUMERICS_FIELDS)}")
    unknown = sorted(set(numerics) - set(NUMERICS_FIELDS))
    if unknown:
        raise errors.ConfigError(
            f"{name} has {', '.join(map(repr, unknown))}: only the numerics "
            f"{', '.join(NUMERICS_FIELDS)} may be set there (the architecture comes from "
            "the checkpoint's config.json)"
        )
    return dict(numerics)


@gin.configurable
def model_config(
    hf_dir: Optional[str] = gin.REQUIRED,
    dtype: str = "float32",
    param_dtype: str = "float32",
    remat_policy: str = "none",
    scan_layers: bool = True,
    attention_impl: str = "auto",
    vocab_chunk_size: int = 0,
    **overrides,
) -> DecoderConfig:
    """The gin edge: a config from a local HF directory, with numerics overrides
    (`attention_impl`, `vocab_chunk_size`: see DecoderConfig)."""
    return DecoderConfig.from_pretrained(
        hf_dir,
        dtype=dtype,
        param_dtype=param_dtype,
        remat_policy=remat_policy,
        scan_layers=scan_layers,
        attention_impl=attention_impl,
        vocab_chunk_size=vocab_chunk_size,
        **overrides,
    )


def gemma3_text_config(d: dict) -> dict:
    """The text tower's config of a multimodal Gemma 3 config.json (model_type 'gemma3',
    Gemma3ForConditionalGeneration: gemma-3-4b / 12b / 27b): its `text_config` as a full
    gemma3_text dict (transformers' Gemma3TextConfig fills the fields the hub files leave to
    the defaults), with the wrapper's token ids where it sets them (the IT checkpoints put
    eos [1, 106] there). The vision tower's config is not read: the decoder is the text model.

    Args:
      d: the multimodal config as a dict.
    Returns:
      The text config dict (model_type 'gemma3_text').
    """
    text = d.get("text_config")
    if not text:
        raise errors.ConfigError(
            "config.json model_type 'gemma3' (the multimodal Gemma 3) has no text_config: "
            "cannot find the text model's config"
        )
    text = dict(text.to_dict() if hasattr(text, "to_dict") else text)
    text_type = text.pop("model_type", "gemma3_text")
    if text_type != "gemma3_text":
        raise errors.ConfigError(
            f"config.json text_config.model_type = {text_type!r} in a 'gemma3' checkpoint; expected 'gemma3_text'"
        )
    import transformers

    text = transformers.Gemma3TextConfig(**text).to_dict()
    for k in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if d.get(k) is not None:
            text[k] = d[k]
    text["model_type"] = "gemma3_text"
    return text


@gin.configurable
def custom_model_config(sliding_window_pattern: Optional[int] = None, **kwargs) -> DecoderConfig:
    """A config spelled out in gin (model files, tiny test models, architecture ablations).

    `sliding_window_pattern` n (HF's Gemma spelling) sets layer_types: every n-th layer global,
    the others sliding (Gemma 2: 2, alternating from a sliding first layer; Gemma 3: 6)."""
    if sliding_window_pattern is not None:
        errors.whole("custom_model_config.sliding_window_pattern", sliding_window_pattern, 1)
        kwargs["layer_types"] = tuple(
            "sliding_attention" if (i + 1) % sliding_window_pattern else "full_attention"
            for i in range(kwargs.get("num_layers", 0))
        )
    return DecoderConfig(**kwargs)
