"""Adapters as Hugging Face PEFT adapter directories (adapter_config.json +
adapter_model.safetensors), which `peft.PeftModel.from_pretrained` loads onto the transformers
model of the same base, and back.

PEFT's LoRA computes W x + s B(A(dropout(x))) with lora_A.weight [r, in] and lora_B.weight
[out, r] on the HF projection's flattened input / output; ours hold A [*in, r] and B [r, *out]
on the decoder's kernel layout [*in, *out], flattened in the same (row-major) order as
hf_io's kernels, so A = lora_A.weight.T and B = lora_B.weight.T reshaped.

A reward model's adapter (adapters + its trainable score head) is a SEQ_CLS adapter: PEFT
keeps the head whole as a `modules_to_save` module, saved as base_model.model.score.weight
([1, hidden], the transpose of our [hidden, 1] kernel), which
`PeftModel.from_pretrained(LlamaForSequenceClassification(base), dir)` loads.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import load_file, save_file

from rlaif_jax import sharding as shd
from rlaif_jax.errors import ConfigError, UserError, binding, existing_dir
from rlaif_jax.lora.adapters import LORA_A, LORA_B, abstract_adapters
from rlaif_jax.lora.settings import LoraSettings

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
SCORE_MODULE = "score"  # the HF *ForSequenceClassification head (hf_io's score.weight)
SCORE_KEY = f"base_model.model.{SCORE_MODULE}.weight"
_HF_PARENT = {"attn": "self_attn", "mlp": "mlp"}


def _modules(adapters: Any, scanned: bool, num_layers: int):
    """(HF module path "model.layers.3.self_attn.q_proj", A, B) of each adapter, layer by layer."""
    for layer in range(num_layers):
        tree = adapters.get("layers", {}) if scanned else adapters.get(f"layers_{layer}", {})
        for parent, projs in sorted(tree.items()):
            for name, node in sorted(projs.items()):
                a, b = node[LORA_A], node[LORA_B]
                if scanned:
                    a, b = a[layer], b[layer]
                yield f"model.layers.{layer}.{_HF_PARENT[parent]}.{name}", a, b


def save_peft(
    path: str, cfg, adapters: Any, settings: LoraSettings, base_model: str = "", score_kernel: Any = None
) -> None:
    """Writes adapters (an adapter tree: init_adapters' layout) as a PEFT LoRA directory.
    With `score_kernel` (a reward model's score head kernel, [hidden, 1]) the directory is
    a SEQ_CLS adapter carrying the head as `modules_to_save`. Every process must call it
    (gathers are collective); process 0 writes."""
    tensors, targets, names = {}, [], set()
    if score_kernel is not None:
        tensors[SCORE_KEY] = np.ascontiguousarray(np.asarray(shd.to_host(score_kernel), np.float32).T)
    for module, a, b in _modules(adapters, cfg.scan_layers, cfg.num_layers):
        a, b = shd.to_host(a), shd.to_host(b)
        r = a.shape[-1]
        tensors[f"base_model.model.{module}.lora_A.weight"] = np.ascontiguousarray(a.reshape(-1, r).T)
        tensors[f"base_model.model.{module}.lora_B.weight"] = np.ascontiguousarray(b.reshape(r, -1).T)
        targets.append(module)
        names.add(module.rsplit(".", 1)[-1])
    if jax.process_index() != 0:
        return
    # Every layer with the same projections: their names (PEFT matches module name suffixes);
    # otherwise the exact module paths, so PEFT wraps exactly the adapted modules.
    uniform = len(targets) == len(names) * cfg.num_layers
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM" if score_kernel is None else "SEQ_CLS",
        "base_model_name_or_path": base_model or None,
        "r": settings.rank,
        "lora_alpha": settings.alpha,
        "lora_dropout": settings.dropout,
        "use_rslora": settings.rslora,
        "target_modules": sorted(names) if uniform else targets,
        "bias": "none",
        "fan_in_fan_out": False,
        "modules_to_save": None if score_kernel is None else [SCORE_MODULE],
        "init_lora_weights": True,
        "inference_mode": True,
    }
    os.makedirs(path, exist_ok=True)
    save_file(tensors, os.path.join(path, WEIGHTS), metadata={"format": "pt"})
    with open(os.path.join(path, CONFIG), "w") as f:
        json.dump(config, f, indent=2)


def _check_config(path: str, config: dict, settings: LoraSettings) -> None:
    b = lambda p: binding(f"LoraSettings.{p}")  # noqa: E731
    where = os.path.join(path, CONFIG)
    if config.get("peft_type") != "LORA":
        raise UserError(f"{where}: peft_type {config.get('peft_type')!r} is not LORA; only LoRA adapters load")
    for key, setting, ours in (
        ("r", "rank", settings.rank),
        ("lora_alpha", "alpha", settings.alpha),
        ("use_rslora", "rslora", settings.rslora),
    ):
        theirs = config.get(key, False if key == "use_rslora" else None)
        if theirs != ours and not (isinstance(theirs, (int, float)) and math.isclose(theirs, ours)):
            raise ConfigError(f"{where} has {key} = {theirs!r} but {b(setting)} = {ours!r}; set it to {theirs!r}")
    for key, ok in (("bias", "none"), ("fan_in_fan_out", False)):
        if config.get(key, ok) != ok:
            raise UserError(f"{where}: {key} = {config[key]!r} is not supported (only {ok!r})")
    extra = set(config.get("modules_to_save") or ()) - {SCORE_MODULE, "classifier"}  # PEFT adds both for SEQ_CLS
    if extra:
        raise UserError(f"{where}: modules_to_save {sorted(extra)!r} is not supported (only a reward model's score)")


def load_peft(path: str, model, settings: LoraSettings) -> Any:
    """The adapter tree of a PEFT LoRA directory for `model` (placed on its layout). Its
    rank, alpha and rsLoRA must equal `settings`', and its adapted modules must be exactly
    the ones settings.targets selects."""
    existing_dir(binding("LoraSettings.init_adapter"), path, "PEFT adapter directory", must_contain=CONFIG)
    with open(os.path.join(path, CONFIG)) as f:
        _check_config(path, json.load(f), settings)
    tensors = load_file(os.path.join(path, WEIGHTS))
    tensors.pop(SCORE_KEY, None)  # a reward model's head: load_peft_score
    cfg = model.cfg
    abstract = abstract_adapters(model, settings)
    unboxed = nn.unbox(abstract)
    shardings = model.layout.param_shardings(abstract) if model.layout is not None else None
    used = set()

    def fetch(module: str, which: str, shape: tuple) -> np.ndarray:
        key = f"base_model.model.{module}.lora_{which}.weight"
        if key not in tensors:
            raise UserError(
                f"{os.path.join(path, WEIGHTS)} has no {key}, which {binding('LoraSettings.targets')} = "
                f"{settings.targets!r} adapts; adapt the modules the adapter was trained on"
            )
        used.add(key)
        t = tensors[key].T  # A: [in, r]; B: [r, out]
        return t.reshape(shape).astype(np.float32)

    out: dict = {}
    for top, parents in unboxed.items():
        out[top] = {}
        for parent, projs in parents.items():
            out[top][parent] = {}
            for name, node in projs.items():
                a_shape, b_shape = node[LORA_A].shape, node[LORA_B].shape
                if cfg.scan_layers:
                    mods = [f"model.layers.{i}.{_HF_PARENT[parent]}.{name}" for i in range(cfg.num_layers)]
                    a = np.stack([fetch(m, "A", a_shape[1:]) for m in mods])
                    b = np.stack([fetch(m, "B", b_shape[1:]) for m in mods])
                else:
                    m = f"model.layers.{top.split('_')[1]}.{_HF_PARENT[parent]}.{name}"
                    a, b = fetch(m, "A", a_shape), fetch(m, "B", b_shape)
                out[top][parent][name] = {
                    LORA_A: a.astype(node[LORA_A].dtype),
                    LORA_B: b.astype(node[LORA_B].dtype),
                }
    extra = sorted(set(tensors) - used)
    if extra:
        raise UserError(
            f"{os.path.join(path, WEIGHTS)} adapts modules that {binding('LoraSettings.targets')} = "
            f"{settings.targets!r} leaves out ({extra[0]}, ... {len(extra)} tensors); widen the targets"
        )
    if shardings is None:
        return jax.tree.map(jnp.asarray, out)
    return jax.tree.map(jax.device_put, out, shardings)


def load_peft_score(path: str, hidden_size: int) -> Any:
    """The score head kernel ([hidden, 1], float32) a SEQ_CLS adapter directory carries, or
    None when it has none (a language model's adapter: the run's head stays fresh)."""
    from safetensors import safe_open

    with safe_open(os.path.join(path, WEIGHTS), "numpy") as f:
        if SCORE_KEY not in f.keys():
            return None
        w = f.get_tensor(SCORE_KEY)
    if w.shape != (1, hidden_size):
        raise UserError(
            f"{os.path.join(path, WEIGHTS)}: {SCORE_KEY} has shape {tuple(w.shape)}, not (1, {hidden_size}) "
            "(one score per sequence on this model's hidden size); give an adapter of this base"
        )
    return np.ascontiguousarray(w.T).astype(np.float32)
