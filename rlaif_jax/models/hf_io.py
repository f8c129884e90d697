"""Import from and export to Hugging Face model directories (safetensors, sharded or not),
without torch.

Import reads each device shard straight out of the memory-mapped safetensors files with
`jax.make_array_from_callback`, so a host only ever materialises the slices its own devices
hold: a 70B checkpoint never exists whole in one host's memory.

Mixtral experts are read from the hub layout (`block_sparse_moe.gate` and one
`block_sparse_moe.experts.E.{w1,w2,w3}` tensor per expert, which is also what transformers
5.x `save_pretrained` writes) or from transformers 5.x's in-memory fused layout
(`mlp.gate`, `mlp.experts.gate_up_proj` [E, 2F, H], `mlp.experts.down_proj` [E, H, F]);
export writes the hub layout.

A multimodal checkpoint (Gemma3ForConditionalGeneration) is read as its text model (the
tensors under `language_model.model.`, or `model.language_model.`); the vision tower is
dropped, and export writes a text-only checkpoint (Gemma3ForCausalLM).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from rlaif_jax import sharding as shd
from rlaif_jax.errors import WeightsError
from rlaif_jax.models.config import DecoderConfig
from rlaif_jax.models.heads import SCORE_HEAD, head_param
from rlaif_jax.models.params import abstract_params, build_model
from rlaif_jax.models.tokenizer_fingerprint import save_fingerprint

log = logging.getLogger(__name__)

# Buffers some old checkpoints carry; they are recomputed, never loaded.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclasses.dataclass(frozen=True)
class _Entry:
    """How one of our params is stored in HF: key and layout kind."""

    hf_key: str  # with "{e}" for one tensor per expert (kind expert_kernel)
    kind: str  # kernel | qkv_kernel | o_kernel | qkv_bias | vector | expert_kernel |
    # expert_stack_kernel | fused_gate | fused_up
    num_experts: int = 0

    def hf_keys(self) -> list:
        if self.kind == "expert_kernel":
            return [self.hf_key.format(e=e) for e in range(self.num_experts)]
        return [self.hf_key]


# Where the MoE tensors of a layer live, by checkpoint layout (see the module docstring).
MOE_LAYOUTS = ("hub", "fused")


def _moe_entries(cfg: DecoderConfig, pre: str, layout: str) -> dict:
    E = cfg.num_experts
    if layout == "hub":
        moe = pre + "block_sparse_moe."
        return {
            ("moe", "router", "kernel"): _Entry(moe + "gate.weight", "kernel"),
            ("moe", "gate_proj"): _Entry(moe + "experts.{e}.w1.weight", "expert_kernel", E),
            ("moe", "up_proj"): _Entry(moe + "experts.{e}.w3.weight", "expert_kernel", E),
            ("moe", "down_proj"): _Entry(moe + "experts.{e}.w2.weight", "expert_kernel", E),
        }
    if layout == "fused":
        return {
            ("moe", "router", "kernel"): _Entry(pre + "mlp.gate.weight", "kernel"),
            ("moe", "gate_proj"): _Entry(pre + "mlp.experts.gate_up_proj", "fused_gate"),
            ("moe", "up_proj"): _Entry(pre + "mlp.experts.gate_up_proj", "fused_up"),
            ("moe", "down_proj"): _Entry(pre + "mlp.experts.down_proj", "expert_stack_kernel"),
        }
    raise ValueError(f"unknown MoE layout {layout!r}; one of {MOE_LAYOUTS}")


def _layer_entries(cfg: DecoderConfig, i: int, moe_layout: str = "hub") -> dict:
    pre = f"model.layers.{i}."
    e = {
        ("attn", "q_proj", "kernel"): _Entry(pre + "self_attn.q_proj.weight", "qkv_kernel"),
        ("attn", "k_proj", "kernel"): _Entry(pre + "self_attn.k_proj.weight", "qkv_kernel"),
        ("attn", "v_proj", "kernel"): _Entry(pre + "self_attn.v_proj.weight", "qkv_kernel"),
        ("attn", "o_proj", "kernel"): _Entry(pre + "self_attn.o_proj.weight", "o_kernel"),
        ("input_norm", "scale"): _Entry(pre + "input_layernorm.weight", "vector"),
        ("post_attn_norm", "scale"): _Entry(pre + "post_attention_layernorm.weight", "vector"),
    }
    if cfg.is_moe:
        e.update(_moe_entries(cfg, pre, moe_layout))
    else:
        e[("mlp", "gate_proj", "kernel")] = _Entry(pre + "mlp.gate_proj.weight", "kernel")
        e[("mlp", "up_proj", "kernel")] = _Entry(pre + "mlp.up_proj.weight", "kernel")
        e[("mlp", "down_proj", "kernel")] = _Entry(pre + "mlp.down_proj.weight", "kernel")
    if cfg.qkv_bias:
        for n in ("q", "k", "v"):
            e[("attn", f"{n}_proj", "bias")] = _Entry(pre + f"self_attn.{n}_proj.bias", "qkv_bias")
    if cfg.attention_bias:
        e[("attn", "o_proj", "bias")] = _Entry(pre + "self_attn.o_proj.bias", "vector")
    if cfg.qk_norm:
        for n in ("q", "k"):
            e[("attn", f"{n}_norm", "scale")] = _Entry(pre + f"self_attn.{n}_norm.weight", "vector")
    if cfg.is_gemma:
        e[("pre_mlp_norm", "scale")] = _Entry(pre + "pre_feedforward_layernorm.weight", "vector")
        e[("post_mlp_norm", "scale")] = _Entry(pre + "post_feedforward_layernorm.weight", "vector")
    if cfg.mlp_bias:
        for n in ("gate", "up", "down"):
            e[("mlp", f"{n}_proj", "bias")] = _Entry(pre + f"mlp.{n}_proj.bias", "vector")
    return e


def _global_entries(cfg: DecoderConfig, lm_head: bool, score_head: bool) -> dict:
    e = {
        ("embed", "embedding"): _Entry("model.embed_tokens.weight", "vector"),
        ("final_norm", "scale"): _Entry("model.norm.weight", "vector"),
    }
    if lm_head and not cfg.tie_word_embeddings:
        e[("lm_head", "kernel")] = _Entry("lm_head.weight", "kernel")
    if score_head:
        e[(head_param(SCORE_HEAD), "kernel")] = _Entry("score.weight", "kernel")
    return e


# -- layout transforms (HF tensor <-> our param), also on slices ---------------------------


def _read_slice(get: Callable, kind: str, shape: tuple, index: tuple) -> np.ndarray:
    """Our-layout slice `index` of a param of our-layout `shape`, read from HF storage via
    `get(hf_index)` (which slices the memory-mapped tensor; `get(expert, hf_index)` for
    expert_kernel, one tensor per expert)."""
    index = tuple(slice(*s.indices(d)) for s, d in zip(index, shape))
    if kind == "expert_kernel":  # ours [E, in, out]; expert e's HF tensor [out, in]
        ex, i, o = index
        return np.stack([get(e, (o, i)).T for e in range(ex.start, ex.stop)])
    if kind == "expert_stack_kernel":  # ours [E, in, out] = HF [E, out, in] transposed
        ex, i, o = index
        return get((ex, o, i)).transpose(0, 2, 1)
    if kind in ("fused_gate", "fused_up"):  # ours [E, H, F] from HF gate_up [E, 2F, H]
        ex, h, f = index
        off = 0 if kind == "fused_gate" else shape[2]
        return get((ex, slice(f.start + off, f.stop + off), h)).transpose(0, 2, 1)
    if kind == "vector":
        return get(index)
    if kind == "kernel":  # ours [in, out] = HF [out, in].T
        return get((index[1], index[0])).T
    if kind == "qkv_kernel":  # ours [E, N, D] = HF [N*D, E].T
        e, n, d = index
        D = shape[2]
        rows = slice(n.start * D, n.stop * D)
        x = get((rows, e)).T
        return x.reshape(x.shape[0], n.stop - n.start, D)[:, :, d]
    if kind == "o_kernel":  # ours [H, D, E] = HF [E, H*D].T
        h, d, e = index
        D = shape[1]
        x = get((e, slice(h.start * D, h.stop * D))).T
        return x.reshape(h.stop - h.start, D, x.shape[1])[:, d, :]
    if kind == "qkv_bias":  # ours [N, D] = HF [N*D]
        n, d = index
        D = shape[1]
        x = get((slice(n.start * D, n.stop * D),))
        return x.reshape(n.stop - n.start, D)[:, d]
    raise ValueError(kind)


def _to_hf(kind: str, x: np.ndarray) -> np.ndarray:
    if kind == "vector":
        return x
    if kind == "kernel":
        return np.ascontiguousarray(x.T)
    if kind == "qkv_kernel":
        return np.ascontiguousarray(x.reshape(x.shape[0], -1).T)
    if kind == "o_kernel":
        return np.ascontiguousarray(x.reshape(-1, x.shape[-1]).T)
    if kind == "qkv_bias":
        return x.reshape(-1)
    raise ValueError(kind)


def _to_hf_tensors(entry: _Entry, x: np.ndarray) -> list:
    """[(HF key, tensor)] of one of our (per-layer) params, in the hub layout."""
    if entry.kind == "expert_kernel":
        return [(key, np.ascontiguousarray(x[e].T)) for e, key in enumerate(entry.hf_keys())]
    if entry.kind in ("expert_stack_kernel", "fused_gate", "fused_up"):
        raise ValueError(f"{entry.hf_key}: the fused MoE layout is read, never written")
    return [(entry.hf_key, _to_hf(entry.kind, x))]


def _hf_shape(kind: str, shape: tuple) -> tuple:
    """The HF shape of one stored tensor of an entry, given our (per-layer) param shape."""
    if kind == "expert_kernel":
        return (shape[2], shape[1])
    if kind == "expert_stack_kernel":
        return (shape[0], shape[2], shape[1])
    if kind in ("fused_gate", "fused_up"):
        return (shape[0], 2 * shape[2], shape[1])
    return _to_hf(kind, np.empty(shape, np.int8)).shape


# -- reading ---------------------------------------------------------------------------------

_REDO = "; re-export the model directory, or copy it again"


def _short(e: BaseException) -> str:
    return " ".join(str(e).split())[:100]


class _SafetensorsDir:
    """Lazy, memory-mapped access to every tensor of an HF directory by name."""

    def __init__(self, path: str):
        from safetensors import safe_open

        self.path = path
        index_file = os.path.join(path, "model.safetensors.index.json")
        single = os.path.join(path, "model.safetensors")
        if os.path.exists(index_file):
            try:
                with open(index_file) as f:
                    weight_map = json.load(f)["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise WeightsError(f"{index_file}: not a valid safetensors index ({e}){_REDO}") from None
        elif os.path.exists(single):
            weight_map = None
        else:
            raise WeightsError(
                f"{path}: no model.safetensors or model.safetensors.index.json "
                "(only safetensors checkpoints are supported; convert .bin files first)"
            )
        self._handles = {}
        files = sorted(set(weight_map.values())) if weight_map else ["model.safetensors"]
        for fname in files:
            fpath = os.path.join(path, fname)
            if not os.path.exists(fpath):
                raise WeightsError(f"{fpath}: missing, though the index lists it (an incomplete copy?){_REDO}")
            try:
                self._handles[fname] = safe_open(fpath, framework="numpy")
            except Exception as e:
                raise WeightsError(
                    f"{fpath}: not a readable safetensors file ({_short(e)}; truncated?){_REDO}"
                ) from None
        if weight_map is None:
            weight_map = {k: "model.safetensors" for k in self._handles["model.safetensors"].keys()}
        self.weight_map = weight_map

    def keys(self):
        return self.weight_map.keys()

    def shape(self, key: str) -> tuple:
        return tuple(self._handle(key).get_slice(key).get_shape())

    def _handle(self, key):
        try:
            return self._handles[self.weight_map[key]]
        except KeyError:
            raise WeightsError(f"{self.path}: checkpoint has no tensor {key!r}{_REDO}") from None

    def getter(self, key: str) -> Callable:
        sl = self._handle(key).get_slice(key)
        fname = self.weight_map[key]

        def get(index):
            try:
                return np.asarray(sl[index])
            except Exception as e:  # truncated file, bad offsets
                raise WeightsError(
                    f"{os.path.join(self.path, fname)}: cannot read {key!r} ({_short(e)}; truncated?){_REDO}"
                ) from None

        return get


# Where a multimodal checkpoint (Gemma3ForConditionalGeneration) keeps its text model, as
# (prefix of the decoder's `model.` tensors, key of an untied LM head): the hub files and
# transformers' save_pretrained write the first; the second is the in-memory naming of
# transformers >= 4.52, which some fine-tunes were saved with.
_TEXT_TOWER_PREFIXES = (
    ("language_model.model.", "language_model.lm_head.weight"),
    ("model.language_model.", "lm_head.weight"),
)


class _TextTower:
    """A multimodal checkpoint's text model seen under the text-only names (`model.*`,
    `lm_head.weight`), as _SafetensorsDir presents them; `dropped` counts the other tensors
    (vision tower, multimodal projector), which the decoder does not use."""

    def __init__(self, store: _SafetensorsDir, prefix: str, head: str):
        self.path = store.path
        self._store = store
        self._names = {}
        for key in store.keys():
            if key.startswith(prefix):
                self._names["model." + key[len(prefix) :]] = key
            elif key == head:
                self._names["lm_head.weight"] = key
        self.dropped = len(store.weight_map) - len(self._names)
        self.weight_map = {ours: store.weight_map[theirs] for ours, theirs in self._names.items()}

    def keys(self):
        return self.weight_map.keys()

    def shape(self, key: str) -> tuple:
        return self._store.shape(self._names.get(key, key))

    def getter(self, key: str) -> Callable:
        return self._store.getter(self._names.get(key, key))


def _text_tower(store: _SafetensorsDir):
    """The store itself, or its text tower when the text model's tensors sit under a
    multimodal wrapper's prefix (gemma-3-4b / 12b / 27b); the other tensors are dropped with
    one logged line."""
    if "model.embed_tokens.weight" in store.weight_map:
        return store
    for prefix, head in _TEXT_TOWER_PREFIXES:
        if prefix + "embed_tokens.weight" in store.weight_map:
            tower = _TextTower(store, prefix, head)
            log.info(
                "%s: a multimodal checkpoint: loading its text model (%s*) and dropping %d tensor(s) of the "
                "vision tower / multimodal projector",
                store.path,
                prefix,
                tower.dropped,
            )
            return tower
    return store


def _plan(cfg: DecoderConfig, lm_head: bool, score_head: bool, moe_layout: str = "hub") -> dict:
    """Our flat param path -> list of HF entries (one per layer when layers are stacked)."""
    plan = {k: [v] for k, v in _global_entries(cfg, lm_head, score_head).items()}
    for i in range(cfg.num_layers):
        for k, v in _layer_entries(cfg, i, moe_layout).items():
            if cfg.scan_layers:
                plan.setdefault(("layers",) + k, []).append(v)
            else:
                plan[(f"layers_{i}",) + k] = [v]
    return plan


def _entry_getter(store: _SafetensorsDir, entry: _Entry) -> Callable:
    if entry.kind == "expert_kernel":
        per_expert = [store.getter(k) for k in entry.hf_keys()]
        return lambda e, index: per_expert[e](index)
    return store.getter(entry.hf_key)


def _moe_layout(cfg: DecoderConfig, store: _SafetensorsDir) -> str:
    """hub unless the checkpoint holds the fused expert tensors instead."""
    if cfg.is_moe:
        fused = _moe_entries(cfg, "model.layers.0.", "fused")[("moe", "gate_proj")].hf_key
        hub = _moe_entries(cfg, "model.layers.0.", "hub")[("moe", "router", "kernel")].hf_key
        if fused in store.weight_map and hub not in store.weight_map:
            return "fused"
    return "hub"


def load_hf(
    path: str,
    layout: Optional[shd.Layout] = None,
    config: Optional[DecoderConfig] = None,
    lm_head: bool = True,
    score_head: bool = False,
    **config_overrides,
) -> tuple[DecoderConfig, Any]:
    """(config, params) from a local HF directory. With a layout, params come back sharded
    as `build_model(config, ..., layout=layout)` expects them and each host reads only its
    shards; without, on the default device.
    `score_head` loads a LlamaForSequenceClassification's `score` (num_labels=1) as our
    scalar head named "score"."""
    cfg = config or DecoderConfig.from_pretrained(path, **config_overrides)
    store = _text_tower(_SafetensorsDir(path))
    heads = (SCORE_HEAD,) if score_head else ()
    model = build_model(cfg, lm_head=lm_head, scalar_heads=heads)
    boxed = abstract_params(model)
    abstract = flatten_dict(nn.unbox(boxed))
    if layout is None:
        mesh = shd.single_device_mesh()
        shardings = jax.tree.map(lambda _: NamedSharding(mesh, P()), abstract)
    else:
        shardings = flatten_dict(layout.param_shardings(boxed))
    plan = _plan(cfg, lm_head, score_head, _moe_layout(cfg, store))
    missing = [k for entries in plan.values() for e in entries for k in e.hf_keys() if k not in store.weight_map]
    if missing:
        raise WeightsError(
            f"{path}: checkpoint lacks {len(missing)} tensor(s) the config needs, e.g. {missing[:2]} "
            f"(model_type={cfg.model_type}, tie_word_embeddings={cfg.tie_word_embeddings}){_REDO}"
        )
    used = {k for entries in plan.values() for e in entries for k in e.hf_keys()}
    # A reward model initialised from a policy drops its LM head on purpose.
    skip = _IGNORED_SUFFIXES + (() if lm_head else ("lm_head.weight",))
    extra = [k for k in store.keys() if k not in used and not k.endswith(skip)]
    if extra:
        log.warning("%s: %d checkpoint tensor(s) not used by the model, e.g. %s", path, len(extra), extra[:3])

    flat = {}
    for our_path, entries in plan.items():
        spec = abstract[our_path]
        stacked = len(entries) > 1 or (cfg.scan_layers and our_path[0] == "layers")
        per_shape = spec.shape[1:] if stacked else spec.shape
        for e in entries:
            want = _hf_shape(e.kind, per_shape)
            for key in e.hf_keys():
                got = store.shape(key)
                if got != want:
                    raise WeightsError(
                        f"{path}: tensor {key!r} has shape {got}, its config.json implies {want}; the weights "
                        "and config.json are from different models: re-export the directory"
                    )
        getters = [_entry_getter(store, e) for e in entries]
        kinds = [e.kind for e in entries]
        dtype = spec.dtype

        def callback(index, getters=getters, kinds=kinds, stacked=stacked, per_shape=per_shape, dtype=dtype):
            if not stacked:
                return _read_slice(getters[0], kinds[0], per_shape, index).astype(dtype)
            layers = range(*index[0].indices(len(getters)))
            return np.stack([_read_slice(getters[i], kinds[i], per_shape, index[1:]).astype(dtype) for i in layers])

        flat[our_path] = jax.make_array_from_callback(spec.shape, shardings[our_path], callback)
    return cfg, unflatten_dict(flat)


# -- writing ---------------------------------------------------------------------------------


def save_hf(
    path: str,
    cfg: DecoderConfig,
    params: Any,
    tokenizer: Any = None,
    max_shard_bytes: int = 5 * 1024**3,
    dtype: Optional[Any] = None,
    score_head: bool = False,
) -> None:
    """Write an HF directory that transformers' AutoModelForCausalLM (or, with
    `score_head`, AutoModelForSequenceClassification) loads. Tensors are fetched one
    layer at a time, so the host never holds more than one layer plus one output shard.
    Every process must call it (gathers are collective); only process 0 writes."""
    from safetensors.numpy import save_file

    lm_head = "lm_head" in params or cfg.tie_word_embeddings
    plan = _plan(cfg, lm_head and not score_head, score_head)
    writer = jax.process_index() == 0
    if writer:
        os.makedirs(path, exist_ok=True)
    flat = flatten_dict(params)
    shards: list[dict] = []
    current: dict = {}
    current_bytes = 0
    for our_path, entries in plan.items():
        if our_path not in flat:
            raise KeyError(f"params have no {'/'.join(our_path)} (needed for {entries[0].hf_key})")
        arr = flat[our_path]
        for i, e in enumerate(entries):
            stacked = cfg.scan_layers and our_path[0] == "layers"
            x = shd.to_host(arr[i] if stacked else arr)
            if not writer:
                continue
            for key, t in _to_hf_tensors(e, x):
                if dtype is not None:
                    t = t.astype(dtype)
                if current and current_bytes + t.nbytes > max_shard_bytes:
                    shards.append(current)
                    current, current_bytes = {}, 0
                current[key] = t
                current_bytes += t.nbytes
    if not writer:
        return
    shards.append(current)
    n = len(shards)
    weight_map = {}
    total = 0
    for k, shard in enumerate(shards):
        fname = "model.safetensors" if n == 1 else f"model-{k + 1:05d}-of-{n:05d}.safetensors"
        save_file(shard, os.path.join(path, fname), metadata={"format": "pt"})
        for key, x in shard.items():
            weight_map[key] = fname
            total += x.nbytes
    if n > 1:
        with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    hf_cfg = cfg.to_hf()
    if score_head:
        hf_cfg.architectures = [hf_cfg.architectures[0].replace("ForCausalLM", "ForSequenceClassification")]
        hf_cfg.num_labels = 1
    if dtype is not None:
        hf_cfg.dtype = str(np.dtype(dtype))
    else:
        hf_cfg.dtype = str(np.dtype(cfg.params_dtype))
    hf_cfg.save_pretrained(path)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
        save_fingerprint(path, tokenizer)  # kept even where the tokenizer's files are not copied on
