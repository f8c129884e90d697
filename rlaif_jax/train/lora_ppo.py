"""PPO / RLOO / GRPO with LoRA: PPOTrainer whose programs take the frozen base as a constant.

The state holds the trainable tree only: {"policy": the policy's adapters (+ the value head
when value_model = "shared"), "value": the critic's own adapters + value head (a separate
critic)}. Both sit on the one frozen base, the SFT policy (quantized for QLoRA), which is
also the KL reference with the adapters off: PPO's four models hold one copy of the
weights (plus the reward model). A separate critic is adapters on the policy's base, not
TRL's reward-model-initialised critic (which would need a second frozen base).

The mixin is combined with PPOTrainer in rlaif_jax.train.ppo (LoraPPOTrainer), which imports
this module.
"""

from __future__ import annotations

from typing import Any

import jax
from jax.sharding import NamedSharding, PartitionSpec

from rlaif_jax.lora.adapters import (
    LoraModel,
    dequantize_base,
    init_adapters,
    merge,
    merged_weights,
    quantize_base,
)
from rlaif_jax.lora.settings import LoraSettings
from rlaif_jax.models.decoder import init_scalar_head
from rlaif_jax.models.heads import head_param
from rlaif_jax.models.params import build_model
from rlaif_jax.train.step import TrainState, batch_shardings, jit_step, placed_shardings


def split(cfg, pol_params, config, lora: LoraSettings, layout, seed: int, value_head: str) -> tuple[dict, dict]:
    """(trainable, frozen) of a LoRA PPO run from the loaded SFT policy: the policy's adapters
    (+ the value head when shared), a separate critic's adapters + value head, and the frozen
    base {"policy": policy base (quantized), "value": the same arrays without the LM head}."""
    base = quantize_base(pol_params, lora, layout)
    shared = config.uses_critic and config.value_model == "shared"
    policy_model = build_model(cfg, scalar_heads=(value_head,) if shared else (), layout=layout)
    trainable = {"policy": init_adapters(policy_model, lora, jax.random.key(seed + 2))}
    head = lambda: init_scalar_head(cfg, jax.random.key(seed + 1), layout)  # noqa: E731
    frozen = {"policy": base, "value": None}
    if shared:
        trainable["policy"][head_param(value_head)] = head()
    elif config.uses_critic:
        value_model = build_model(cfg, lm_head=False, scalar_heads=(value_head,), layout=layout)
        trainable["value"] = {
            **init_adapters(value_model, lora, jax.random.key(seed + 3)),
            head_param(value_head): head(),
        }
        frozen["value"] = {k: v for k, v in base.items() if k != "lm_head"}
    return trainable, frozen


class LoraPPOMixin:
    """Mixed into PPOTrainer (train.ppo.LoraPPOTrainer): its constructor's arguments plus lora
    (the settings) and frozen (split's). Its ref_params are frozen["policy"] (adapters off)."""

    def __init__(self, *args, lora: LoraSettings, frozen: dict, **kw):
        super().__init__(*args, **kw)
        self.lora, self.frozen = lora, frozen
        self.policy = LoraModel(self.policy, lora)
        self.sampler_model = LoraModel(self.sampler_model, lora)
        if self.value is not None:
            self.value = LoraModel(self.value, lora)
        self._frozen_now: Any = None  # the base while _update traces (its loss merges it)

    def _full(self, params, frozen) -> dict:
        return {k: merge(frozen[k], v) if frozen.get(k) is not None else v for k, v in params.items()}

    def full_params(self, params) -> dict:
        """The adapted models' trees (base + adapters) of a state's params."""
        return self._full(params, self.frozen)

    def merged_policy(self, params, float_shapes) -> Any:
        """The policy's float weights with its adapters folded in (the HF export); float_shapes:
        the loaded policy's ShapeDtypeStructs (to dequantise a QLoRA base)."""
        base = dequantize_base(self.frozen["policy"], self.lora, float_shapes)
        return merged_weights(merge(base, params["policy"]), self.lora)

    def _loss(self, params, mb):
        # Called under jax.grad by _update: merged here, so only the adapters get gradients.
        return super()._loss(self._full(params, self._frozen_now), mb)

    def _sample_f(self, params, prompt_batch, rng, frozen):
        return super()._sample(self._full(params, frozen), prompt_batch, rng)

    def _score_f(self, params, ref_params, reward_params, kl_coef, prompt_batch, response, lengths, frozen):
        full = self._full(params, frozen)
        return super()._score(full, ref_params, reward_params, kl_coef, prompt_batch, response, lengths)

    def _update_f(self, state: TrainState, batch: dict, frozen):
        self._frozen_now = frozen
        try:
            return super()._update(state, batch)
        finally:
            self._frozen_now = None

    def compile(self, state: TrainState, prompt_batch: tuple) -> tuple:
        frozen = self.frozen
        if self.mesh is None:
            sample, score = jax.jit(self._sample_f), jax.jit(self._score_f)
            update = jax.jit(self._update_f, donate_argnums=(0,))
        else:
            mesh = self.mesh
            rep = NamedSharding(mesh, PartitionSpec())
            params, fz = placed_shardings(state.params, mesh), placed_shardings(frozen, mesh)
            ref, rm = placed_shardings(self.ref_params, mesh), placed_shardings(self.reward_params, mesh)
            rollout = jax.eval_shape(self._sample_f, state.params, prompt_batch, jax.random.key(0), frozen)
            scored = jax.eval_shape(
                self._score_f,
                state.params,
                self.ref_params,
                self.reward_params,
                state.extra["kl_coef"],
                prompt_batch,
                *rollout,
                frozen,
            )
            prompts, responses = batch_shardings(prompt_batch, mesh), batch_shardings(rollout, mesh)
            sample = jax.jit(self._sample_f, in_shardings=(params, prompts, rep, fz), out_shardings=responses)
            score = jax.jit(
                self._score_f,
                in_shardings=(params, ref, rm, rep, prompts, *responses, fz),
                out_shardings=(batch_shardings(scored[0], mesh), rep),
            )
            update = jit_step(self._update_f, state, scored[0], mesh, frozen)
        # The jitted functions, which take the base last (the AOT compile lowers them).
        self.jitted = (sample, score, update)
        return (
            lambda params, prompts, key: sample(params, prompts, key, frozen),
            lambda *a: score(*a, frozen),
            lambda state, batch: update(state, batch, frozen),
        )
