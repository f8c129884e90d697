"""PPO (and RLOO / GRPO group baselines) with AI-feedback rewards.

One iteration is two compiled programs and no per-token Python:
  rollout: sample responses with the KV-cache sampler, then score the prompt+response
           sequences (policy and reference log-probs, values, reward-model scores),
           per-token KL-penalised rewards and advantages (GAE by reverse scan, or group
           baselines);
  update:  `ppo_epochs` passes of shuffled mini-batches (a scan inside a scan) of the
           clipped policy loss, clipped value loss and entropy bonus.

Sequences keep the sampler's layout: the left-padded prompt (segment 0 on padding) then the
response, with explicit positions, so no host round trip is needed between sampling and
scoring. Response tokens after EOS carry segment 0 and mask 0.

The state is the shared TrainState (the KL coefficient in its `extra`) and `train_ppo` runs
on the shared run loop (rlaif_jax.train.run_loop), as `train` does.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from typing import Callable, Optional, Sequence

import gin
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from rlaif_jax import sharding as shd
from rlaif_jax.data.records import read_records
from rlaif_jax.data.tokenize.encode import Encoder
from rlaif_jax.data.tokenize.tokenizer import load_tokenizer
from rlaif_jax.errors import (
    ConfigError,
    UserError,
    binding,
    existing_dir,
    existing_path,
    in_range,
    non_negative,
    one_of,
    positive,
    whole,
)
from rlaif_jax.lora import LoraSettings
from rlaif_jax.models import DecoderConfig, apply, build_model, gather_last
from rlaif_jax.models.config import numerics_overrides
from rlaif_jax.models.decoder import init_scalar_head
from rlaif_jax.models.heads import SCORE_HEAD, VALUE_HEAD, head_param, without_head
from rlaif_jax.models.hf_io import load_hf, save_hf
from rlaif_jax.models.remote import local_hf_dir
from rlaif_jax.preflight import ppo_checks, run_preflight
from rlaif_jax.sampling import SamplingParams, _generate, left_pad
from rlaif_jax.train import lora_ppo
from rlaif_jax.train.advantages import (
    GROUP_STDS,
    KL_ESTIMATORS,
    KLController,
    gae,
    group_advantages,
    kl_estimate,
    masked_mean,
    normalize_sequences,
    whiten,
)
from rlaif_jax.train.logprobs import chunked, lm_forward, model_token_stats
from rlaif_jax.train.optim import make_optimizer
from rlaif_jax.train.run_loop import Closing, LoopSettings, Plan, RunKind, check_length, run
from rlaif_jax.train.step import (
    TrainState,
    batch_shardings,
    init_state,
    jit_step,
    placed_shardings,
    record_nonfinite,
    update_if_finite,
)

log = logging.getLogger(__name__)

GROUP_NORMALIZATIONS = ("whiten", "none", "batch")


@gin.configurable
@dataclasses.dataclass(frozen=True)
class PPOConfig:
    rollout_batch_size: int = 16  # prompts per iteration (x samples_per_prompt sequences)
    samples_per_prompt: int = 1  # K > 1 for rloo / grpo
    mini_batch_size: int = 8  # sequences per gradient step
    ppo_epochs: int = 4
    max_new_tokens: int = 64
    max_prompt_length: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    gamma: float = 1.0
    lam: float = 0.95
    clip_range: float = 0.2
    clip_range_value: float = 0.2
    vf_coef: float = 0.1
    entropy_coef: float = 0.0
    kl_estimator: str = "k1"
    # "gae" (critic), "rloo" or "grpo" (group baselines, no critic).
    advantage_estimator: str = "gae"
    whiten_advantages: bool = True
    whiten_rewards: bool = False
    # Group baselines (rloo / grpo) only; the defaults are ours, the alternatives TRL's.
    # grpo_std: "population" (ddof 0, + 1e-6) or "sample" (ddof 1, + 1e-4, TRL's GRPOTrainer).
    grpo_std: str = "population"
    # group_normalization: "whiten" (whiten_advantages applies: token-weighted whitening
    # over the batch), "none" (TRL's GRPO, and its RLOO by default) or "batch" (TRL's RLOO
    # normalize_advantages=True: (a - mean) / (sample std + 1e-4) over sequences).
    group_normalization: str = "whiten"
    # Scores are clipped to +-score_clip when set.
    score_clip: Optional[float] = None
    # Subtracted from the score of responses that never emit EOS (TRL's missing_eos_penalty).
    missing_eos_penalty: Optional[float] = None
    # "shared": a value head on the policy trunk; "separate": its own decoder (initialised
    # from the reward model when there is one, as TRL does).
    value_model: str = "separate"

    def __post_init__(self):
        b = lambda p: binding(f"PPOConfig.{p}")  # noqa: E731
        for name in (
            "rollout_batch_size",
            "samples_per_prompt",
            "mini_batch_size",
            "ppo_epochs",
            "max_new_tokens",
            "max_prompt_length",
        ):
            whole(b(name), getattr(self, name), 1)
        positive(b("temperature"), self.temperature, hint="PPO samples from the policy: > 0")
        in_range(b("top_p"), self.top_p, 0, 1, lo_open=True)
        whole(b("top_k"), self.top_k, 0, hint=">= 0; 0 is off")
        in_range(b("gamma"), self.gamma, 0, 1)
        in_range(b("lam"), self.lam, 0, 1)
        positive(b("clip_range"), self.clip_range)
        positive(b("clip_range_value"), self.clip_range_value)
        non_negative(b("vf_coef"), self.vf_coef)
        non_negative(b("entropy_coef"), self.entropy_coef)
        one_of(b("kl_estimator"), self.kl_estimator, KL_ESTIMATORS)
        one_of(b("advantage_estimator"), self.advantage_estimator, ("gae", "rloo", "grpo"))
        one_of(b("grpo_std"), self.grpo_std, GROUP_STDS)
        one_of(b("group_normalization"), self.group_normalization, GROUP_NORMALIZATIONS)
        one_of(b("value_model"), self.value_model, ("shared", "separate"))
        positive(b("score_clip"), self.score_clip, hint="> 0, or None for no clipping")
        non_negative(b("missing_eos_penalty"), self.missing_eos_penalty, hint=">= 0 (it is subtracted), or None")
        if self.advantage_estimator != "gae" and self.samples_per_prompt < 2:
            raise ConfigError(
                f"{b('advantage_estimator')} = {self.advantage_estimator!r} needs "
                f"{b('samples_per_prompt')} >= 2 (got {self.samples_per_prompt})"
            )
        n = self.rollout_batch_size * self.samples_per_prompt
        if n % self.mini_batch_size:
            raise ConfigError(
                f"{b('mini_batch_size')} = {self.mini_batch_size}: a rollout of {n} sequences "
                f"({b('rollout_batch_size')} x samples_per_prompt) does not split into mini-batches "
                f"of that size; pick a divisor of {n}"
            )

    @property
    def uses_critic(self) -> bool:
        return self.advantage_estimator == "gae"

    @property
    def sampling(self) -> SamplingParams:
        return SamplingParams(
            max_new_tokens=self.max_new_tokens, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k
        )


# -- scoring -----------------------------------------------------------------------------


def response_logps_and_entropy(logits, tokens, P):
    """Log-prob of each response token (positions P.. of tokens) and the policy entropy
    there, from full-sequence logits; logits[t-1] predicts tokens[t]."""
    lg = logits[:, P - 1 : -1].astype(jnp.float32)
    logp_all = jax.nn.log_softmax(lg, axis=-1)
    logp = jnp.take_along_axis(logp_all, tokens[:, P:, None], axis=-1)[..., 0]
    entropy = -(jnp.exp(logp_all) * logp_all).sum(-1)
    return logp, entropy


def response_stats(model, params, out, tokens, P, temperature):
    """`response_logps_and_entropy` of `lm_forward`'s output: by vocabulary chunks when the
    model has vocab_chunk_size (no [B, T, V] logits), else from out["logits"] / temperature."""
    if chunked(model):
        stats = model_token_stats(model, params, out, tokens, temperature)
        return stats.logp[:, P:], stats.entropy[:, P:]
    return response_logps_and_entropy(out["logits"] / temperature, tokens, P)


def full_sequences(prompt_tokens, prompt_pos, prompt_seg, response, lengths):
    """Concatenate left-padded prompts and responses; tokens after each row's length get
    segment 0 (masked, never attended)."""
    B, R = response.shape
    rmask = (jnp.arange(R)[None, :] < lengths[:, None]).astype(jnp.int32)
    tokens = jnp.concatenate([prompt_tokens, response], axis=1)
    positions = jnp.concatenate([prompt_pos, prompt_pos[:, -1:] + 1 + jnp.arange(R)[None, :]], axis=1)
    segs = jnp.concatenate([prompt_seg, rmask], axis=1)
    return tokens, positions, segs, rmask


# -- the trainer -------------------------------------------------------------------------


class PPOTrainer:
    """Holds the models and compiled programs; `iteration(state, prompts)` runs one
    rollout + update. `reward_fn(tokens, positions, segment_ids, response_mask, P) -> [B]`
    replaces the reward model when given (programmatic rewards, tests).

    The state is a TrainState whose params are {"policy": ..., "value": ... (separate
    critic only)} and whose extra holds the KL coefficient ({"kl_coef": float32 scalar}; see
    `initial_extra`). With a mesh, the three programs are compiled on the first iteration
    with explicit shardings: every model's params as placed, prompts, responses and the
    scored batch over the data axes, the state donated to the update.
    """

    def __init__(
        self,
        cfg: DecoderConfig,
        config: PPOConfig,
        tx,
        layout: Optional[shd.Layout],
        ref_params,
        reward_model=None,
        reward_params=None,
        reward_fn: Optional[Callable] = None,
        eos_ids=(),
        pad_id: int = 0,
        kl: KLController = KLController(),
        value_cfg: Optional[DecoderConfig] = None,
    ):
        self.cfg, self.c, self.tx = cfg, config, tx
        self.mesh = layout.mesh if layout is not None else None
        self.kl = kl
        shared = config.uses_critic and config.value_model == "shared"
        self.policy = build_model(cfg, scalar_heads=(VALUE_HEAD,) if shared else (), layout=layout)
        self.sampler_model = build_model(cfg, layout=layout)
        separate = config.uses_critic and not shared
        self.value = (
            build_model(value_cfg or cfg, lm_head=False, scalar_heads=(VALUE_HEAD,), layout=layout)
            if separate
            else None
        )
        self.ref_params = ref_params
        self.reward_model, self.reward_params, self.reward_fn = reward_model, reward_params, reward_fn
        if reward_fn is None and reward_model is None:
            raise ValueError("PPO needs a reward model or a reward_fn")
        self.sampling = dataclasses.replace(config.sampling, eos_ids=tuple(eos_ids), pad_id=pad_id)
        self._programs: Optional[tuple] = None

    def initial_extra(self) -> dict:
        """TrainState.extra of a fresh PPO state: the KL controller's initial coefficient."""
        return {"kl_coef": jnp.asarray(self.kl.init_coef, jnp.float32)}

    def compile(self, state: TrainState, prompt_batch: tuple) -> tuple:
        """(sample, score, update): the jitted programs for states and prompt batches shaped
        like these (called by the first `iteration`)."""
        if self.mesh is None:
            return jax.jit(self._sample), jax.jit(self._score), jax.jit(self._update, donate_argnums=(0,))
        mesh = self.mesh
        rep = NamedSharding(mesh, PartitionSpec())
        params = placed_shardings(state.params, mesh)
        ref, rm = placed_shardings(self.ref_params, mesh), placed_shardings(self.reward_params, mesh)
        key = jax.random.key(0)
        rollout = jax.eval_shape(self._sample, state.params, prompt_batch, key)
        scored = jax.eval_shape(
            self._score,
            state.params,
            self.ref_params,
            self.reward_params,
            state.extra["kl_coef"],
            prompt_batch,
            *rollout,
        )
        prompts, responses = batch_shardings(prompt_batch, mesh), batch_shardings(rollout, mesh)
        sample = jax.jit(self._sample, in_shardings=(params, prompts, rep), out_shardings=responses)
        score = jax.jit(
            self._score,
            in_shardings=(params, ref, rm, rep, prompts, *responses),
            out_shardings=(batch_shardings(scored[0], mesh), rep),
        )
        return sample, score, jit_step(self._update, state, scored[0], mesh)

    # policy params without the value head feed the sampler (same tree minus one leaf)
    def _policy_lm(self, params):
        return without_head(params["policy"], VALUE_HEAD)

    def _values(self, params, tokens, positions, segs, P):
        if self.value is not None:
            out = apply(self.value, params["value"], tokens, positions, segs)
        else:
            out = apply(self.policy, params["policy"], tokens, positions, segs)
        # The value of the state before emitting response token t sits at position t-1.
        return out[VALUE_HEAD][:, P - 1 : -1]

    def _scores(self, reward_params, tokens, positions, segs, rmask, P):
        if self.reward_fn is not None:
            return self.reward_fn(tokens, positions, segs, rmask, P)
        out = apply(self.reward_model, reward_params, tokens, positions, segs)
        return gather_last(out[SCORE_HEAD], segs)

    def _sample(self, params, prompt_batch, rng):
        """(response [B, R] token ids, lengths [B]) sampled from the policy for left-padded
        prompts (tokens, positions, segment_ids, each [B, P])."""
        response, lengths, _ = _generate(self.sampler_model, self.sampling, self._policy_lm(params), *prompt_batch, rng)
        return response, lengths

    def _score(self, params, ref_params, reward_params, kl_coef, prompt_batch, response, lengths):
        """The update's batch (full [B, P+R] sequences; [B, R] log-probs, values, advantages,
        returns and the response mask) and the rollout's metrics."""
        c = self.c
        prompt_tokens, prompt_pos, prompt_seg = prompt_batch
        P = prompt_tokens.shape[1]
        tokens, positions, segs, rmask = full_sequences(prompt_tokens, prompt_pos, prompt_seg, response, lengths)
        mask = rmask.astype(jnp.float32)
        lm, policy_lm = self.sampler_model, self._policy_lm(params)
        pol = lm_forward(lm, policy_lm, tokens, positions, segs)
        logp, entropy = response_stats(lm, policy_lm, pol, tokens, P, c.temperature)
        ref = lm_forward(lm, ref_params, tokens, positions, segs)
        ref_logp, _ = response_stats(lm, ref_params, ref, tokens, P, c.temperature)
        logp, ref_logp = logp * mask, ref_logp * mask

        scores = self._scores(reward_params, tokens, positions, segs, rmask, P).astype(jnp.float32)
        eos = jnp.asarray(self.sampling.eos_ids or (-1,))
        last_tok = jnp.take_along_axis(response, jnp.maximum(lengths - 1, 0)[:, None], 1)[:, 0]
        has_eos = jnp.isin(last_tok, eos)
        if c.missing_eos_penalty is not None:
            scores = jnp.where(has_eos, scores, scores - c.missing_eos_penalty)
        if c.score_clip is not None:
            scores = jnp.clip(scores, -c.score_clip, c.score_clip)

        kl = kl_estimate(logp, ref_logp, c.kl_estimator) * mask
        kl_sum = kl.sum(1)
        last = jax.nn.one_hot(jnp.maximum(lengths - 1, 0), mask.shape[1]) * mask
        rewards = -kl_coef * kl + last * scores[:, None]
        if c.whiten_rewards:
            rewards = whiten(rewards, mask, shift_mean=False)
        if c.uses_critic:
            values = self._values(params, tokens, positions, segs, P) * mask
            adv, returns = gae(rewards, values, mask, c.gamma, c.lam)
        else:
            seq_reward = scores - kl_coef * kl_sum
            seq_adv = group_advantages(seq_reward, c.samples_per_prompt, c.advantage_estimator, std=c.grpo_std)
            if c.group_normalization == "batch":
                seq_adv = normalize_sequences(seq_adv)
            adv = seq_adv[:, None] * mask
            values = returns = jnp.zeros_like(mask)
        if c.whiten_advantages and (c.uses_critic or c.group_normalization == "whiten"):
            adv = whiten(adv, mask)
        batch = dict(
            tokens=tokens,
            positions=positions,
            segment_ids=segs,
            mask=mask,
            old_logp=logp,
            old_values=values,
            advantages=adv,
            returns=returns,
        )
        metrics = {
            "objective/kl": kl_sum.mean(),
            "objective/entropy": (entropy * mask).sum(1).mean(),
            "objective/scores": scores.mean(),
            "objective/rlhf_reward": (scores - kl_coef * kl_sum).mean(),
            "objective/kl_coef": kl_coef,
            "val/num_eos_tokens": has_eos.sum(),
            "val/response_length": lengths.mean(),
        }
        return batch, metrics

    def _loss(self, params, mb):
        c = self.c
        P = mb["tokens"].shape[1] - mb["mask"].shape[1]
        mask = mb["mask"]
        out = lm_forward(self.policy, params["policy"], mb["tokens"], mb["positions"], mb["segment_ids"])
        logp, entropy = response_stats(self.policy, params["policy"], out, mb["tokens"], P, c.temperature)
        log_ratio = (logp - mb["old_logp"]) * mask
        ratio = jnp.exp(log_ratio)
        adv = mb["advantages"]
        pg1 = -adv * ratio
        pg2 = -adv * jnp.clip(ratio, 1 - c.clip_range, 1 + c.clip_range)
        pg_loss = masked_mean(jnp.maximum(pg1, pg2), mask)
        ent = masked_mean(entropy, mask)
        loss = pg_loss - c.entropy_coef * ent + self._moe_aux(self.policy, out)
        metrics = {
            "loss/policy_avg": pg_loss,
            "policy/entropy_avg": ent,
            "policy/approxkl_avg": 0.5 * masked_mean(log_ratio**2, mask),
            "policy/clipfrac_avg": masked_mean((pg2 > pg1).astype(jnp.float32), mask),
            "val/ratio": masked_mean(ratio, mask),
        }
        if c.uses_critic:
            if self.value is not None:
                v_out = apply(self.value, params["value"], mb["tokens"], mb["positions"], mb["segment_ids"])
                v = v_out[VALUE_HEAD][:, P - 1 : -1]
                loss = loss + self._moe_aux(self.value, v_out)
            else:
                v = out[VALUE_HEAD][:, P - 1 : -1]
            v_clipped = mb["old_values"] + jnp.clip(v - mb["old_values"], -c.clip_range_value, c.clip_range_value)
            vf1, vf2 = (v - mb["returns"]) ** 2, (v_clipped - mb["returns"]) ** 2
            vf_loss = 0.5 * masked_mean(jnp.maximum(vf1, vf2), mask)
            loss = loss + c.vf_coef * vf_loss
            metrics["loss/value_avg"] = vf_loss
            metrics["val/clipfrac_avg"] = masked_mean((vf2 > vf1).astype(jnp.float32), mask)
        if "moe_aux_loss" in out:
            metrics["moe/aux_loss"] = out["moe_aux_loss"]
        return loss, metrics

    @staticmethod
    def _moe_aux(model, out):
        """router_aux_loss_coef * the load-balancing loss of an MoE model with
        output_router_logits (over the mini-batch's real tokens), else 0."""
        if "moe_aux_loss" not in out:
            return 0.0
        return model.cfg.router_aux_loss_coef * out["moe_aux_loss"]

    def _update(self, state: TrainState, batch: dict):
        """`ppo_epochs` passes of shuffled mini-batches over the scored batch. A mini-batch
        whose loss or gradient norm is not finite is skipped (update_if_finite) and the
        iteration recorded in state.nonfinite_step, as the shared train step does."""
        c = self.c
        n = batch["tokens"].shape[0]
        n_mb = n // c.mini_batch_size
        grad_fn = jax.value_and_grad(self._loss, has_aux=True)

        def epoch(carry, key):
            perm = jax.random.permutation(key, n).reshape(n_mb, c.mini_batch_size)

            def minibatch(carry, idx):
                params, opt_state, all_finite = carry
                mb = jax.tree.map(lambda x: x[idx], batch)
                (loss, m), grads = grad_fn(params, mb)
                params, opt_state, finite, grad_norm = update_if_finite(self.tx, grads, opt_state, params, loss)
                m = dict(m, loss=loss, grad_norm=grad_norm)
                return (params, opt_state, all_finite & finite), m

            return jax.lax.scan(minibatch, carry, perm)

        rng = jax.random.wrap_key_data(state.rng)
        rng, key = jax.random.split(rng)
        carry = (state.params, state.opt_state, jnp.asarray(True))
        (params, opt_state, finite), m = jax.lax.scan(epoch, carry, jax.random.split(key, c.ppo_epochs))
        metrics = jax.tree.map(jnp.mean, m)
        return state.replace(
            step=state.step + 1,
            params=params,
            opt_state=opt_state,
            rng=jax.random.key_data(rng),
            nonfinite_step=record_nonfinite(state, finite),
        ), metrics

    def iteration(self, state: TrainState, prompt_batch: tuple) -> tuple[TrainState, dict]:
        """One rollout + update.

        Args:
          state: the TrainState (donated: use the returned one).
          prompt_batch: (tokens, positions, segment_ids), each [rollout_batch_size x
            samples_per_prompt, max_prompt_length], placed on the mesh (shard_batch).
        Returns:
          (state, metrics): metrics are device scalars, except the host seconds of each
          phase (a device sync per phase, not per token); `metrics_row` makes the floats of
          a metrics.jsonl row of them. Only an adaptive KL controller reads the rollout's
          KL on the host every iteration.
        """
        if self._programs is None:
            self._programs = self.compile(state, prompt_batch)
        sample, score, update = self._programs
        t0 = time.perf_counter()
        rng = jax.random.wrap_key_data(state.rng)
        rng, key = jax.random.split(rng)
        response, lengths = sample(state.params, prompt_batch, key)
        jax.block_until_ready(lengths)
        t1 = time.perf_counter()
        batch, metrics = score(
            state.params, self.ref_params, self.reward_params, state.extra["kl_coef"], prompt_batch, response, lengths
        )
        jax.block_until_ready(batch["advantages"])
        t2 = time.perf_counter()
        state = state.replace(rng=jax.random.key_data(rng))
        state, up = update(state, batch)
        metrics = {**metrics, **up}
        jax.block_until_ready(metrics)
        t3 = time.perf_counter()
        if self.kl.target is not None:  # adaptive; a fixed coefficient stays as it is, on device
            kl_coef = self.kl.update(
                state.extra["kl_coef"], jax.device_get(metrics["objective/kl"]), prompt_batch[0].shape[0]
            )
            state = state.replace(extra={**state.extra, "kl_coef": jnp.asarray(kl_coef, jnp.float32)})
        metrics.update(
            {"time/rollout": t1 - t0, "time/scoring": t2 - t1, "time/update": t3 - t2, "rollout_tokens": lengths.sum()}
        )
        return state, metrics


class LoraPPOTrainer(lora_ppo.LoraPPOMixin, PPOTrainer):
    """PPOTrainer training LoRA adapters on a frozen base (rlaif_jax.train.lora_ppo)."""


_HOST_TIMES = ("time/rollout", "time/scoring", "time/update")


def metrics_row(metrics: dict) -> dict:
    """The floats of one PPOTrainer.iteration's metrics: its device metrics, the seconds of
    each phase and the rollout's tokens per second."""
    device = {k: v for k, v in metrics.items() if k not in _HOST_TIMES and k != "rollout_tokens"}
    row = {k: float(v) for k, v in jax.device_get(device).items()}
    row.update({k: metrics[k] for k in _HOST_TIMES})
    row["rollout_tokens_per_second"] = float(jax.device_get(metrics["rollout_tokens"])) / metrics["time/rollout"]
    return row


# -- prompts -------------------------------------------------------------------------------


class PromptStream:
    """Fixed-shape batches of left-padded prompt ids, reshuffled each epoch from a seed;
    state = (epoch, index) for exact resume. Each prompt is repeated K times in a row for
    group baselines."""

    def __init__(
        self,
        prompt_ids: Sequence[Sequence[int]],
        batch_size: int,
        repeat: int,
        max_prompt_length: int,
        pad_id: int,
        seed: int = 0,
        state: Optional[dict] = None,
    ):
        if not prompt_ids:
            raise UserError(
                f"{binding('train_ppo.prompts')}: no prompts in it; give a record set with a `prompt` field"
            )
        self.ids = [list(p)[-max_prompt_length:] for p in prompt_ids]
        self.batch_size, self.repeat, self.P, self.pad_id, self.seed = (
            batch_size,
            repeat,
            max_prompt_length,
            pad_id,
            seed,
        )
        self.epoch, self.index = (int(state["epoch"]), int(state["index"])) if state else (0, 0)

    def _order(self):
        return np.random.default_rng([self.seed, self.epoch]).permutation(len(self.ids))

    def get_state(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def __next__(self):
        picked = []
        order = self._order()
        while len(picked) < self.batch_size:
            if self.index >= len(order):
                self.epoch, self.index = self.epoch + 1, 0
                order = self._order()
            picked.append(self.ids[order[self.index]])
            self.index += 1
        rows = [p for p in picked for _ in range(self.repeat)]
        toks, pos, segs = left_pad(rows, self.pad_id, self.P)
        return toks[:, -self.P :], pos[:, -self.P :], segs[:, -self.P :]


# -- the gin run function ---------------------------------------------------------------------


def _load_prompts(prompts_dir: str, tok, max_prompt_length: int, template: str) -> list:

    texts = [r["prompt"] for r in read_records(prompts_dir)]
    enc = Encoder(tok, template, max_length=max_prompt_length + 1, max_prompt_length=max_prompt_length)
    return [list(map(int, x)) for x in enc.encode_prompts(texts)]


@gin.configurable(denylist=["reward_fn", "stop_after"])
def train_ppo(
    run_dir: str = gin.REQUIRED,
    policy: str = gin.REQUIRED,
    prompts: str = gin.REQUIRED,
    num_iterations: int = gin.REQUIRED,
    reward_model: Optional[str] = None,
    reward_fn: Optional[Callable] = None,
    config: PPOConfig = PPOConfig(),
    kl: KLController = KLController(),
    optimizer: Callable = make_optimizer,
    mesh: Callable = shd.make_mesh,
    template: str = "paper",
    seed: int = 0,
    numerics: Optional[dict] = None,
    loop: Optional[LoopSettings] = None,
    lora: Optional[LoraSettings] = None,
    stop_after: Optional[int] = None,
) -> dict:
    """PPO from an SFT policy (HF dir; also the reference) against a reward model (HF dir
    exported by the reward trainer) or a programmatic reward_fn, on prompts from records
    (PROMPTS, DEMONSTRATIONS or PREFERENCES: anything with a `prompt` field).

    Runs on the shared run loop (rlaif_jax.train.run_loop), as `train` does: run_dir may be
    a URL (gs://...), and so may policy and reward_model (fetched to local disk once per
    host); the run holds run_dir's writer lock from start to end; `loop` (logging,
    checkpoints, export) defaults to a LoopSettings built here (log_every defaults to every
    iteration). `numerics` ({dtype, param_dtype, remat_policy, ...}, models.config.
    NUMERICS_FIELDS) applies to the policy, reference, critic and reward model: their HF
    exports' config.json carry none, so without it all four run float32 without remat.
    `lora` (rlaif_jax.train.lora_ppo; rank 0 off) trains adapters on the frozen SFT policy, which is
    also the KL reference with the adapters off; defaults to LoraSettings() built here (gin).
    Returns the summary: {"iteration": num_iterations, **the last logged metrics}.
    """
    loop = loop if loop is not None else LoopSettings()
    lora = lora if lora is not None else LoraSettings()
    _check_settings(policy, prompts, num_iterations, reward_model, reward_fn, stop_after)
    overrides = numerics_overrides(binding("train_ppo.numerics"), numerics)
    kind = RunKind("train_ppo", "iteration", "prompt stream", default_log_every=1, desc="ppo")

    def build(data_state: Optional[dict], closing: Closing) -> Plan:
        policy_dir, rm_dir = local_hf_dir(policy, "policy"), local_hf_dir(reward_model, "reward_model")
        run_preflight(ppo_checks(policy_dir, rm_dir))  # before the prompts or any weights load
        return _plan(
            data_state,
            policy=policy_dir,
            reward_model=rm_dir,
            prompts=prompts,
            num_iterations=num_iterations,
            reward_fn=reward_fn,
            config=config,
            kl=kl,
            optimizer=optimizer,
            mesh=mesh,
            template=template,
            seed=seed,
            numerics=overrides,
            lora=lora,
        )

    return run(run_dir, kind, loop, build, stop_after)


def _check_settings(policy, prompts, num_iterations, reward_model, reward_fn, stop_after) -> None:
    """train_ppo's own settings (PPOConfig, KLController and LoopSettings check theirs when built)."""
    b = lambda p: binding(f"train_ppo.{p}")  # noqa: E731
    check_length(b("num_iterations"), num_iterations, stop_after)
    existing_dir(b("policy"), policy, "HF model directory", must_contain="config.json")
    existing_dir(b("reward_model"), reward_model, "HF model directory", must_contain="config.json")
    existing_path(b("prompts"), prompts, "record directory")
    if reward_model is None and reward_fn is None:
        raise ConfigError(f"{b('reward_model')} is unset; give the reward model's HF directory")


def _plan(
    data_state,
    *,
    policy,
    reward_model,
    prompts,
    num_iterations,
    reward_fn,
    config,
    kl,
    optimizer,
    mesh,
    template,
    seed,
    numerics,
    lora,
) -> Plan:
    """train_ppo's prompts, models, state and trainer."""

    tok = load_tokenizer(policy)
    # The optimizer and the prompts before any weights: bad settings and an empty prompt set
    # are found in seconds.
    tx, _ = optimizer(
        params=None,
        default_total_steps=num_iterations
        * config.ppo_epochs
        * (config.rollout_batch_size * config.samples_per_prompt // config.mini_batch_size),
    )
    stream = PromptStream(
        _load_prompts(prompts, tok, config.max_prompt_length, template),
        config.rollout_batch_size,
        config.samples_per_prompt,
        config.max_prompt_length,
        tok.pad_token_id or 0,
        seed,
        data_state,
    )
    the_mesh = mesh() if callable(mesh) else mesh
    layout = shd.Layout(the_mesh, shd.logical_rules())
    cfg, pol_params = load_hf(policy, layout=layout, **numerics)
    ref_params = None if lora.enabled else jax.tree.map(jnp.copy, pol_params)
    params = {"policy": pol_params}
    rm_model = rm_params = None
    value_cfg = cfg
    if reward_model:
        rm_cfg, rm_params = load_hf(reward_model, layout=layout, lm_head=False, score_head=True, **numerics)
        rm_model = build_model(rm_cfg, lm_head=False, scalar_heads=(SCORE_HEAD,), layout=layout)
    if config.uses_critic and not lora.enabled:
        if config.value_model == "shared":
            params["policy"][head_param(VALUE_HEAD)] = init_scalar_head(cfg, jax.random.key(seed + 1), layout)
        else:
            if rm_params is not None:  # TRL initialises the critic from the reward model
                value = jax.tree.map(jnp.copy, without_head(rm_params, SCORE_HEAD))
                value[head_param(VALUE_HEAD)] = {"kernel": jnp.copy(rm_params[head_param(SCORE_HEAD)]["kernel"])}
                value_cfg = rm_cfg
            else:
                value = {k: jax.tree.map(jnp.copy, v) for k, v in pol_params.items() if k != "lm_head"}
                value[head_param(VALUE_HEAD)] = init_scalar_head(cfg, jax.random.key(seed + 1), layout)
                value_cfg = cfg
            params["value"] = value
    eos = tuple(cfg.eos_token_ids) or ((tok.eos_token_id,) if tok.eos_token_id is not None else ())
    make_trainer = PPOTrainer
    if lora.enabled:  # adapters on the frozen policy, which is also the reference (adapters off)
        float_shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), pol_params)
        params, frozen = lora_ppo.split(cfg, pol_params, config, lora, layout, seed, VALUE_HEAD)
        ref_params = frozen["policy"]
        del pol_params
        make_trainer = functools.partial(LoraPPOTrainer, lora=lora, frozen=frozen)
    trainer = make_trainer(
        cfg,
        config,
        tx,
        layout,
        ref_params,
        rm_model,
        rm_params,
        reward_fn,
        eos,
        tok.pad_token_id or 0,
        kl,
        value_cfg=value_cfg,
    )
    state = init_state(params, tx, seed, trainer.initial_extra())

    def export(d: str, state: TrainState) -> None:
        policy = trainer.merged_policy(state.params, float_shapes) if lora.enabled else state.params["policy"]
        save_hf(d, cfg, without_head(policy, VALUE_HEAD), tokenizer=tok)

    return Plan(
        state=state,
        data=stream,
        batches=_prompt_batches(stream),
        step=lambda state, batch: trainer.iteration(state, shd.shard_batch(batch, the_mesh)),
        summarize=lambda metrics, batches, seconds: metrics_row(metrics),
        export=export,
        postfix=lambda m: dict(score=f"{m['objective/scores']:.3f}", kl=f"{m['objective/kl']:.3f}"),
        num_steps=num_iterations,
    )


def _prompt_batches(stream: PromptStream):
    """(stream position before the batch, batch), endlessly: the stream wraps around epochs."""
    while True:
        position = stream.get_state()
        yield position, next(stream)
