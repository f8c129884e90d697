"""LoRA in a trainer: the split parameter tree, the objective wrapper and the run's base pointer.

The train state holds only the trainable leaves (the adapters, plus a reward or value model's
fresh scalar head), so gradients, optimizer moments and checkpoints hold only those. The
frozen base (quantized for QLoRA) is a constant argument of the jitted step, like a DPO
reference, never donated and never copied; the loss merges the two trees by reference.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from rlaif_jax import fileio
from rlaif_jax.errors import UserError, binding
from rlaif_jax.lora import peft_io
from rlaif_jax.lora.adapters import (
    LORA_A,
    LORA_B,
    LoraModel,
    abstract_adapters,
    dequantize_base,
    init_adapters,
    merge,
    merged_weights,
    quantize_base,
)
from rlaif_jax.lora.adapters import select as select_tree
from rlaif_jax.lora.settings import LoraSettings
from rlaif_jax.models.heads import SCORE_HEAD, head_param
from rlaif_jax.models.hf_io import save_hf

BASE_POINTER = "lora_base.json"
PEFT_SUBDIR = "peft_adapter"  # inside the run's HF export


@dataclasses.dataclass(frozen=True)
class LoraObjective:
    """`inner` trained through adapters: loss(model, trainable, batch, frozen, rng, mesh) with
    frozen = {"base": the frozen base tree, "reference": an explicit reference tree or None}.
    The inner objective sees the merged tree as its params and, when it needs a reference,
    the explicit one or else the base itself (adapters off)."""

    inner: Any

    @property
    def data_kind(self):
        return self.inner.data_kind

    @property
    def lm_head(self):
        return self.inner.lm_head

    @property
    def scalar_heads(self):
        return self.inner.scalar_heads

    @property
    def needs_reference(self):
        return self.inner.needs_reference

    def loss(self, model: LoraModel, params, batch, ref_params, rng):
        base, reference = ref_params["base"], ref_params["reference"]
        inner_ref = (base if reference is None else reference) if self.inner.needs_reference else None
        # The adapters' dropout draws from its own stream (the step's key also feeds MoE jitter).
        dropout = None if rng is None else jax.random.fold_in(rng, 0x10A)
        return self.inner.loss(model.with_dropout(dropout), merge(base, params), batch, inner_ref, rng)


@dataclasses.dataclass
class LoraRun:
    """What a trainer needs: the wrapped objective and model, the trainable tree (the train
    state's params), the frozen constants of every step, and the adapted model's weights."""

    objective: LoraObjective
    model: LoraModel
    trainable: Any
    frozen: dict
    settings: LoraSettings
    base_shapes: Any  # the float kernels' ShapeDtypeStructs (to dequantise a QLoRA base)

    def full_params(self, trainable) -> Any:
        """The tree the adapted model applies (base + adapters, still quantized)."""
        return merge(self.frozen["base"], trainable)

    def merged(self, trainable) -> Any:
        """Plain float weights with the adapters folded in: what an HF export holds."""
        base = dequantize_base(self.frozen["base"], self.settings, self.base_shapes)
        return merged_weights(merge(base, trainable), self.settings)

    def adapters(self, trainable) -> Any:
        return select_tree(trainable, lambda p: p[-1] in (LORA_A, LORA_B))

    def export(self, path: str, cfg, trainable, tokenizer=None, base_model: str = "") -> None:
        """The merged HF model at `path` (as a full fine-tuning run exports it) and the PEFT
        adapter alone at path/PEFT_SUBDIR: a CAUSAL_LM adapter for a language model, a
        SEQ_CLS one with the score head as `modules_to_save` for a reward model."""
        score_head = not self.objective.lm_head
        save_hf(path, cfg, self.merged(trainable), tokenizer=tokenizer, score_head=score_head)
        score = trainable[head_param(SCORE_HEAD)]["kernel"] if score_head else None
        peft_io.save_peft(
            os.path.join(path, PEFT_SUBDIR), cfg, self.adapters(trainable), self.settings, base_model, score
        )


def prepare(objective, model, params, settings: LoraSettings, seed: int, reference: Optional[Any] = None) -> LoraRun:
    """Split `params` (as loaded for full training) into the frozen base and the trainable
    tree (fresh or PEFT-loaded adapters, and any scalar head), quantizing the base when asked."""
    heads = {head_param(h) for h in objective.scalar_heads}
    trainable_heads = select_tree(params, lambda p: p[0] in heads)
    base = select_tree(params, lambda p: p[0] not in heads)
    base_shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), base)
    if settings.init_adapter:
        adapters = peft_io.load_peft(settings.init_adapter, model, settings)
        trainable_heads = _score_from_adapter(settings.init_adapter, model, trainable_heads)
    else:
        adapters = init_adapters(model, settings, jax.random.key(seed + 2))
    base = quantize_base(base, settings, model.layout)
    return LoraRun(
        objective=LoraObjective(objective),
        model=LoraModel(model, settings),
        trainable=merge(trainable_heads, adapters),
        frozen={"base": base, "reference": reference},
        settings=settings,
        base_shapes=base_shapes,
    )


def _score_from_adapter(path: str, model, heads: dict) -> dict:
    """A reward model started from a SEQ_CLS adapter takes its score head too (placed as the
    fresh one was); a causal LM given one is refused (its head would be silently dropped)."""
    kernel = peft_io.load_peft_score(path, model.cfg.hidden_size)
    if kernel is None:
        return heads
    name = head_param(SCORE_HEAD)
    if name not in heads:
        raise UserError(
            f"{binding('LoraSettings.init_adapter')} = {path!r} is a reward model's adapter (it carries a "
            "score head); give a language model's adapter, or train a reward model from it"
        )
    fresh = heads[name]["kernel"]
    loaded = jnp.asarray(kernel, fresh.dtype)
    if isinstance(fresh, jax.Array):
        loaded = jax.device_put(loaded, fresh.sharding)
    return {**heads, name: {**heads[name], "kernel": loaded}}


def abstract_split(objective, model, params, settings: LoraSettings, reference: Optional[Any] = None):
    """prepare's (trainable, frozen) for abstract params (placed ShapeDtypeStructs, as the
    AOT compile builds them): what a LoRA run's step takes, without any weights."""
    heads = {head_param(h) for h in objective.scalar_heads}
    boxed = abstract_adapters(model, settings)
    sh = model.layout.param_shardings(boxed) if model.layout is not None else None
    unboxed = nn.unbox(boxed)
    adapters = (
        unboxed
        if sh is None
        else jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), unboxed, sh)
    )
    trainable = merge(select_tree(params, lambda p: p[0] in heads), adapters)
    base = quantize_base(select_tree(params, lambda p: p[0] not in heads), settings, model.layout)
    return trainable, {"base": base, "reference": reference}


def _hash_files(directory: str, names) -> str:
    h = hashlib.sha256()
    for name in names:
        path = os.path.join(directory, name)
        if os.path.exists(path):
            with open(path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
            if name == "model.safetensors.index.json":
                break  # the index names every shard; hashing a 7B model's weights takes minutes
    return h.hexdigest()[:16]


def base_pointer(init_from: Optional[str], cfg, seed: int, settings: LoraSettings) -> dict:
    """The frozen base a LoRA run's checkpoints are adapters of: the HF directory and a hash
    of its config and weights (index), or the random init's config and seed."""
    if init_from:
        files = ("config.json", "model.safetensors.index.json", "model.safetensors")
        base = {"init_from": fileio.abspath(init_from), "hash": _hash_files(init_from, files)}
    else:
        base = {"random_init": {"seed": seed, "config": hashlib.sha256(repr(cfg).encode()).hexdigest()[:16]}}
    return {**base, "quantize": settings.quantize, "rank": settings.rank, "targets": settings.targets}


def check_base_pointer(run_dir: str, pointer: dict) -> None:
    """Writes run_dir/lora_base.json on a fresh run; on a resume, refuses a different base
    (the checkpoints hold only adapters: on another base they would be silently wrong)."""
    path = fileio.join(run_dir, BASE_POINTER)
    try:
        old = fileio.read_json(path)
    except FileNotFoundError:
        fileio.write_json(path, pointer)
        return
    if old != pointer:
        raise UserError(
            f"{path}: this run's checkpoints are LoRA adapters of the base {json.dumps(old)}, but it now starts "
            f"from {json.dumps(pointer)}; resume with the same init_from / model_config, seed and LoraSettings, "
            "or use a new run_dir"
        )
