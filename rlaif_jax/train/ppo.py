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
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from typing import Any, Callable, Optional, Sequence

import flax.struct
import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from rlaif_jax import fileio
from rlaif_jax import sharding as shd
from rlaif_jax.models import DecoderConfig, apply, build_model, gather_last
from rlaif_jax.models.decoder import init_scalar_head
from rlaif_jax.models.hf_io import load_hf, save_hf
from rlaif_jax.sampling import SamplingParams, _generate, left_pad
from rlaif_jax.errors import (
    ConfigError, StorageError, UserError, binding, existing_dir, existing_path, in_range, non_negative, one_of,
    positive, whole,
)
from rlaif_jax.train.advantages import (GROUP_STDS, KL_ESTIMATORS, KLController, gae, group_advantages, kl_estimate,
                                        masked_mean, normalize_sequences, whiten)
from rlaif_jax.train.checkpoint import Checkpointer, abstract_like
from rlaif_jax.train.loop import Closing, check_run_settings, run_lock
from rlaif_jax.train.metrics import MetricsWriter
from rlaif_jax.train.optim import make_optimizer
from rlaif_jax.train.rundir import RunDir, local_hf_dir

log = logging.getLogger(__name__)

VALUE_HEAD = "value"
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
        for name in ("rollout_batch_size", "samples_per_prompt", "mini_batch_size", "ppo_epochs", "max_new_tokens",
                     "max_prompt_length"):
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
            raise ConfigError(f"{b('advantage_estimator')} = {self.advantage_estimator!r} needs "
                              f"{b('samples_per_prompt')} >= 2 (got {self.samples_per_prompt})")
        n = self.rollout_batch_size * self.samples_per_prompt
        if n % self.mini_batch_size:
            raise ConfigError(f"{b('mini_batch_size')} = {self.mini_batch_size}: a rollout of {n} sequences "
                              f"({b('rollout_batch_size')} x samples_per_prompt) does not split into mini-batches "
                              f"of that size; pick a divisor of {n}")

    @property
    def uses_critic(self) -> bool:
        return self.advantage_estimator == "gae"

    @property
    def sampling(self) -> SamplingParams:
        return SamplingParams(max_new_tokens=self.max_new_tokens, temperature=self.temperature,
                              top_p=self.top_p, top_k=self.top_k)


@flax.struct.dataclass
class PPOState:
    step: jax.Array
    params: Any  # {"policy": ..., "value": ... (separate critic only)}
    opt_state: Any
    rng: jax.Array
    kl_coef: jax.Array


# -- scoring -----------------------------------------------------------------------------


def response_logps_and_entropy(logits, tokens, P):
    """Log-prob of each response token (positions P.. of tokens) and the policy entropy
    there, from full-sequence logits; logits[t-1] predicts tokens[t]."""
    lg = logits[:, P - 1:-1].astype(jnp.float32)
    logp_all = jax.nn.log_softmax(lg, axis=-1)
    logp = jnp.take_along_axis(logp_all, tokens[:, P:, None], axis=-1)[..., 0]
    entropy = -(jnp.exp(logp_all) * logp_all).sum(-1)
    return logp, entropy


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
    replaces the reward model when given (programmatic rewards, tests)."""

    def __init__(self, cfg: DecoderConfig, config: PPOConfig, tx, layout, ref_params, reward_model=None,
                 reward_params=None, reward_fn: Optional[Callable] = None, eos_ids=(), pad_id: int = 0,
                 kl: KLController = KLController(), value_cfg: Optional[DecoderConfig] = None):
        self.cfg, self.c, self.tx = cfg, config, tx
        self.kl = kl
        shared = config.uses_critic and config.value_model == "shared"
        self.policy = build_model(cfg, scalar_heads=(VALUE_HEAD,) if shared else (), layout=layout)
        self.sampler_model = build_model(cfg, layout=layout)
        separate = config.uses_critic and not shared
        self.value = build_model(value_cfg or cfg, lm_head=False, scalar_heads=(VALUE_HEAD,), layout=layout) \
            if separate else None
        self.ref_params = ref_params
        self.reward_model, self.reward_params, self.reward_fn = reward_model, reward_params, reward_fn
        if reward_fn is None and reward_model is None:
            raise ValueError("PPO needs a reward model or a reward_fn")
        self.sampling = dataclasses.replace(config.sampling, eos_ids=tuple(eos_ids), pad_id=pad_id)
        self.sample = jax.jit(self._sample)
        self.score = jax.jit(self._score)
        self.update = jax.jit(self._update, donate_argnums=(0,))

    # policy params without the value head feed the sampler (same tree minus one leaf)
    def _policy_lm(self, params):
        return {k: v for k, v in params["policy"].items() if k != f"{VALUE_HEAD}_head"}

    def _values(self, params, tokens, positions, segs, P):
        if self.value is not None:
            out = apply(self.value, params["value"], tokens, positions, segs)
        else:
            out = apply(self.policy, params["policy"], tokens, positions, segs)
        # The value of the state before emitting response token t sits at position t-1.
        return out[VALUE_HEAD][:, P - 1:-1]

    def _scores(self, tokens, positions, segs, rmask, P):
        if self.reward_fn is not None:
            return self.reward_fn(tokens, positions, segs, rmask, P)
        out = apply(self.reward_model, self.reward_params, tokens, positions, segs)
        return gather_last(out["score"], segs)

    def _sample(self, params, prompt_tokens, prompt_pos, prompt_seg, rng):
        response, lengths, _ = _generate(self.sampler_model, self.sampling,
                                         self._policy_lm(params), prompt_tokens, prompt_pos, prompt_seg, rng)
        return response, lengths

    def _score(self, params, kl_coef, prompt_tokens, prompt_pos, prompt_seg, response, lengths):
        c = self.c
        P = prompt_tokens.shape[1]
        tokens, positions, segs, rmask = full_sequences(prompt_tokens, prompt_pos, prompt_seg, response, lengths)
        mask = rmask.astype(jnp.float32)
        pol = apply(self.sampler_model, self._policy_lm(params), tokens, positions, segs)
        logp, entropy = response_logps_and_entropy(pol["logits"] / c.temperature, tokens, P)
        ref = apply(self.sampler_model, self.ref_params, tokens, positions, segs)
        ref_logp, _ = response_logps_and_entropy(ref["logits"] / c.temperature, tokens, P)
        logp, ref_logp = logp * mask, ref_logp * mask

        scores = self._scores(tokens, positions, segs, rmask, P).astype(jnp.float32)
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
        batch = dict(tokens=tokens, positions=positions, segment_ids=segs, mask=mask, old_logp=logp,
                     old_values=values, advantages=adv, returns=returns)
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
        out = apply(self.policy, params["policy"], mb["tokens"], mb["positions"], mb["segment_ids"])
        logp, entropy = response_logps_and_entropy(out["logits"] / c.temperature, mb["tokens"], P)
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
                v = v_out[VALUE_HEAD][:, P - 1:-1]
                loss = loss + self._moe_aux(self.value, v_out)
            else:
                v = out[VALUE_HEAD][:, P - 1:-1]
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

    def _update(self, state: PPOState, batch: dict):
        c = self.c
        n = batch["tokens"].shape[0]
        n_mb = n // c.mini_batch_size
        grad_fn = jax.value_and_grad(self._loss, has_aux=True)

        def epoch(carry, key):
            params, opt_state = carry
            perm = jax.random.permutation(key, n).reshape(n_mb, c.mini_batch_size)

            def minibatch(carry, idx):
                params, opt_state = carry
                mb = jax.tree.map(lambda x: x[idx], batch)
                (loss, m), grads = grad_fn(params, mb)
                updates, opt_state = self.tx.update(grads, opt_state, params)
                params = optax.apply_updates(params, updates)
                m = dict(m, loss=loss, grad_norm=optax.global_norm(grads))
                return (params, opt_state), m

            return jax.lax.scan(minibatch, (params, opt_state), perm)

        rng = jax.random.wrap_key_data(state.rng)
        rng, key = jax.random.split(rng)
        (params, opt_state), m = jax.lax.scan(epoch, (state.params, state.opt_state), jax.random.split(key, c.ppo_epochs))
        metrics = jax.tree.map(jnp.mean, m)
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                             rng=jax.random.key_data(rng)), metrics

    def iteration(self, state: PPOState, prompt_batch: tuple) -> tuple[PPOState, dict]:
        """One rollout + update. Times each phase (a device sync per phase, not per token)."""
        t0 = time.perf_counter()
        rng = jax.random.wrap_key_data(state.rng)
        rng, key = jax.random.split(rng)
        response, lengths = self.sample(state.params, *prompt_batch, key)
        jax.block_until_ready(lengths)
        t1 = time.perf_counter()
        batch, metrics = self.score(state.params, state.kl_coef, *prompt_batch, response, lengths)
        jax.block_until_ready(batch["advantages"])
        t2 = time.perf_counter()
        state = state.replace(rng=jax.random.key_data(rng))
        state, up = self.update(state, batch)
        metrics = jax.device_get({**metrics, **up})
        t3 = time.perf_counter()
        n_tokens = float(jax.device_get(lengths).sum())
        kl_coef = self.kl.update(state.kl_coef, metrics["objective/kl"], prompt_batch[0].shape[0])
        state = state.replace(kl_coef=jnp.asarray(kl_coef, jnp.float32))
        metrics = {k: float(v) for k, v in metrics.items()}
        metrics.update({"time/rollout": t1 - t0, "time/scoring": t2 - t1, "time/update": t3 - t2,
                        "rollout_tokens_per_second": n_tokens / (t1 - t0)})
        return state, metrics


# -- prompts -------------------------------------------------------------------------------


class PromptStream:
    """Fixed-shape batches of left-padded prompt ids, reshuffled each epoch from a seed;
    state = (epoch, index) for exact resume. Each prompt is repeated K times in a row for
    group baselines."""

    def __init__(self, prompt_ids: Sequence[Sequence[int]], batch_size: int, repeat: int, max_prompt_length: int,
                 pad_id: int, seed: int = 0, state: Optional[dict] = None):
        if not prompt_ids:
            raise UserError(f"{binding('train_ppo.prompts')}: no prompts in it; give a record set with a "
                            "`prompt` field")
        self.ids = [list(p)[-max_prompt_length:] for p in prompt_ids]
        self.batch_size, self.repeat, self.P, self.pad_id, self.seed = batch_size, repeat, max_prompt_length, pad_id, seed
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
        return toks[:, -self.P:], pos[:, -self.P:], segs[:, -self.P:]


# -- the gin run function ---------------------------------------------------------------------


def _load_prompts(prompts_dir: str, tok, max_prompt_length: int, template: str) -> list:
    from rlaif_jax.data.records import read_records
    from rlaif_jax.data.tokenize.encode import Encoder

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
    log_every: int = 1,
    checkpoint_every: int = 0,
    keep_checkpoints: int = 3,
    export_hf: bool = True,
    stop_after: Optional[int] = None,
) -> dict:
    """PPO from an SFT policy (HF dir; also the reference) against a reward model (HF dir
    exported by the reward trainer) or a programmatic reward_fn, on prompts from records
    (PROMPTS, DEMONSTRATIONS or PREFERENCES: anything with a `prompt` field).

    run_dir may be a URL (gs://...), as for `train` (see rlaif_jax.train.rundir); so may
    policy and reward_model (fetched to local disk once per host). The run holds run_dir's
    writer lock from start to end."""
    args = dict(locals())  # every argument, passed on to _train_ppo by name
    _check_settings(args)
    with run_lock(run_dir, binding("train_ppo.run_dir")):
        args["policy"] = local_hf_dir(policy, "policy")
        args["reward_model"] = local_hf_dir(reward_model, "reward_model")
        rd = RunDir(args.pop("run_dir"))
        with Closing(rd.close):  # a URL run_dir: the last upload, also after an error
            return _train_ppo(rd, **args)


def _check_settings(a: dict) -> None:
    """train_ppo's own settings (PPOConfig and KLController check theirs when built)."""
    b = lambda p: binding(f"train_ppo.{p}")  # noqa: E731
    check_run_settings("train_ppo", "num_iterations", a["num_iterations"], log_every=a["log_every"],
                       checkpoint_every=a["checkpoint_every"], keep_checkpoints=a["keep_checkpoints"],
                       stop_after=a["stop_after"])
    existing_dir(b("policy"), a["policy"], "HF model directory", must_contain="config.json")
    existing_dir(b("reward_model"), a["reward_model"], "HF model directory", must_contain="config.json")
    existing_path(b("prompts"), a["prompts"], "record directory")
    if a["reward_model"] is None and a["reward_fn"] is None:
        raise ConfigError(f"{b('reward_model')} is unset; give the reward model's HF directory")


def _train_ppo(rd: RunDir, policy, prompts, num_iterations, reward_model, reward_fn, config, kl, optimizer, mesh,
               template, seed, log_every, checkpoint_every, keep_checkpoints, export_hf, stop_after) -> dict:
    from rlaif_jax.data.tokenize.tokenizer import load_tokenizer

    run_dir = rd.path
    tok = load_tokenizer(policy)
    # The optimizer and the prompts before any weights: bad settings and an empty prompt set
    # are found in seconds.
    tx, _ = optimizer(params=None, default_total_steps=num_iterations * config.ppo_epochs
                      * (config.rollout_batch_size * config.samples_per_prompt // config.mini_batch_size))
    ckpt = Checkpointer(fileio.join(run_dir, "checkpoints"), keep_checkpoints)
    with Closing(ckpt.close) as closing:
        try:
            latest = ckpt.latest_step()
            data_state = ckpt.restore_data(latest) if latest is not None else None
            stream = PromptStream(_load_prompts(prompts, tok, config.max_prompt_length, template),
                                  config.rollout_batch_size, config.samples_per_prompt, config.max_prompt_length,
                                  tok.pad_token_id or 0, seed, data_state or None)
            the_mesh = mesh() if callable(mesh) else mesh
            layout = shd.Layout(the_mesh, shd.logical_rules())
            cfg, pol_params = load_hf(policy, layout=layout)
            ref_params = jax.tree.map(jnp.copy, pol_params)
            params = {"policy": pol_params}
            rm_model = rm_params = None
            value_cfg = cfg
            if reward_model:
                rm_cfg, rm_params = load_hf(reward_model, layout=layout, lm_head=False, score_head=True)
                rm_model = build_model(rm_cfg, lm_head=False, scalar_heads=("score",), layout=layout)
            if config.uses_critic:
                if config.value_model == "shared":
                    params["policy"][f"{VALUE_HEAD}_head"] = init_scalar_head(cfg, jax.random.key(seed + 1), layout)
                else:
                    if rm_params is not None:  # TRL initialises the critic from the reward model
                        value = jax.tree.map(jnp.copy, {k: v for k, v in rm_params.items() if k != "score_head"})
                        value[f"{VALUE_HEAD}_head"] = {"kernel": jnp.copy(rm_params["score_head"]["kernel"])}
                        value_cfg = rm_cfg
                    else:
                        value = {k: jax.tree.map(jnp.copy, v) for k, v in pol_params.items() if k != "lm_head"}
                        value[f"{VALUE_HEAD}_head"] = init_scalar_head(cfg, jax.random.key(seed + 1), layout)
                        value_cfg = cfg
                    params["value"] = value
            state = PPOState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                             rng=jax.random.key_data(jax.random.key(seed)),
                             kl_coef=jnp.asarray(kl.init_coef, jnp.float32))
            eos = tuple(cfg.eos_token_ids) or ((tok.eos_token_id,) if tok.eos_token_id is not None else ())
            trainer = PPOTrainer(cfg, config, tx, layout, ref_params, rm_model, rm_params, reward_fn, eos,
                                 tok.pad_token_id or 0, kl, value_cfg=value_cfg)
            if latest is not None:
                state, _, _ = ckpt.restore(latest, abstract_like(state))
            start = int(jax.device_get(state.step))
            writer = MetricsWriter(rd.local, resume_step=start)
            closing.add(writer.close)
            rd.write_text("config.gin", gin.config_str())

            last: dict = {}
            bar = tqdm(total=num_iterations, initial=start, desc="ppo", disable=jax.process_index() != 0)
            closing.add(bar.close)
            for it in range(start, num_iterations):
                batch = shd.shard_batch(next(stream), the_mesh)
                state, m = trainer.iteration(state, batch)
                if not all(np.isfinite(v) for v in m.values()):
                    bad = [k for k, v in m.items() if not np.isfinite(v)]
                    raise FloatingPointError(f"non-finite PPO metrics {bad} at iteration {it} "
                                             f"(prompt stream position {stream.get_state()}); no checkpoint written")
                bar.update(1)
                last = m
                if (it + 1) % log_every == 0 or it + 1 == num_iterations:
                    writer.write(it + 1, m)
                    bar.set_postfix(score=f"{m['objective/scores']:.3f}", kl=f"{m['objective/kl']:.3f}")
                if checkpoint_every and (it + 1) % checkpoint_every == 0 and it + 1 < num_iterations:
                    ckpt.save(it + 1, state, stream.get_state())
                    rd.sync(writer)
                if stop_after is not None and it + 1 >= stop_after:
                    ckpt.wait()
                    return last
            if ckpt.latest_step() != num_iterations:  # a rerun of a finished run (killed in its export) has it
                ckpt.save(num_iterations, state, stream.get_state())
            ckpt.wait()
            rd.write_text("operative_config.gin", gin.operative_config_str())
            rd.sync(writer)
            if export_hf:
                policy_params = {k: v for k, v in state.params["policy"].items() if k != f"{VALUE_HEAD}_head"}
                rd.export_hf(lambda d: save_hf(d, cfg, policy_params, tokenizer=tok),
                             info={"iteration": num_iterations})
            # last: a URL run_dir gets it (on close) after hf/ is complete
            rd.write_text("summary.json", json.dumps({"iteration": num_iterations, **last}, indent=2))
            return last
        except StorageError:
            # A save failing in the background fills the disk, and the next write to fail may
            # be a metrics row: report the checkpoint (the cause) if it failed.
            ckpt.wait()
            raise
