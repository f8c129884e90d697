"""The work the benchmark scripts time: our compiled steps and their PyTorch peers (HF
transformers, SDPA attention, the same shapes and dtype), their analytic FLOPs, and how
time and peak memory are read on CPU and GPU. torch and transformers are imported only by
the peers, so the JAX side runs where they are absent."""

from __future__ import annotations

import os
import resource
import time
from typing import Callable

import numpy as np

from rlaif_jax import sharding as shd
from rlaif_jax.models import build_model, init_params
from rlaif_jax.models.decoder import init_scalar_head
from rlaif_jax.models.heads import SCORE_HEAD, VALUE_HEAD, head_param
from rlaif_jax.train import DPO, SFT, create_state, make_optimizer, make_train_step
from rlaif_jax.train.advantages import KLController
from rlaif_jax.train.ppo import PPOConfig, PPOTrainer
from rlaif_jax.train.step import init_state

BETA = 0.1  # DPO beta of both frameworks' steps
CLIP_NORM = 10.0


def make_batch(rs, batch: int, seq_len: int, vocab: int, prefix: str = "") -> dict:
    """A padded-batch dict of random tokens: the first quarter is prompt (no loss)."""
    prompt = seq_len // 4
    tokens = rs.randint(3, vocab, (batch, seq_len)).astype(np.int32)
    mask = np.zeros((batch, seq_len), np.float32)
    mask[:, prompt:] = 1.0
    return {
        f"{prefix}tokens": tokens,
        f"{prefix}positions": np.broadcast_to(np.arange(seq_len, dtype=np.int32), (batch, seq_len)).copy(),
        f"{prefix}segment_ids": np.ones((batch, seq_len), np.int32),
        f"{prefix}loss_mask": mask,
    }


def train_batch(kind: str, rs, batch: int, seq_len: int, vocab: int) -> dict:
    """`batch` sequences (sft) or `batch` chosen/rejected pairs (dpo)."""
    if kind == "sft":
        return make_batch(rs, batch, seq_len, vocab)
    return {**make_batch(rs, batch, seq_len, vocab, "chosen_"), **make_batch(rs, batch, seq_len, vocab, "rejected_")}


def interleaved_medians(fns: dict, repeats: int, warmup: int = 1) -> dict:
    """Median seconds of each fn() over `repeats` rounds that call every fn once in turn: on a
    shared machine the load then falls on all of them alike, not on whichever ran last."""

    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return {name: float(np.median(ts)) for name, ts in times.items()}


# -- analytic FLOPs -------------------------------------------------------------------------


def train_flops(cfg, kind: str, rows: int, seq_len: int) -> float:
    """Policy forward+backward is 6N per token; DPO's reference forward adds 2N (a third)."""
    return rows * seq_len * cfg.flops_per_token(seq_len) * (4 / 3 if kind == "dpo" else 1)


def forward_flops(cfg, rows: int, seq_len: int, lm_head: bool = True) -> float:
    """One causal forward over rows x seq_len tokens: a third of flops_per_token (less the
    LM head's matmul for a value / reward trunk)."""
    f = rows * seq_len * cfg.flops_per_token(seq_len) / 3
    return f if lm_head else f - rows * seq_len * 2 * cfg.vocab_size * cfg.hidden_size


def generate_flops(cfg, rows: int, prompt_len: int, new_tokens: int) -> float:
    """Prefill of the prompt plus one token at a time against the cache: 2N per token plus
    attention over the context so far (the mean context is prompt + new/2)."""
    n = cfg.num_params(include_embeddings=False, active=True) + cfg.vocab_size * cfg.hidden_size
    attn = 4 * cfg.num_layers * cfg.num_heads * cfg.head_dim * (prompt_len + new_tokens / 2)
    return forward_flops(cfg, rows, prompt_len) + rows * new_tokens * (2 * n + attn)


def ppo_flops(cfg, rows: int, prompt_len: int, new_tokens: int, epochs: int) -> float:
    """One iteration with a separate value model: the rollout, four scoring forwards (policy,
    reference, value and reward trunks) and `epochs` passes of policy and value training."""
    T = prompt_len + new_tokens
    scoring = 2 * forward_flops(cfg, rows, T) + 2 * forward_flops(cfg, rows, T, lm_head=False)
    update = epochs * 3 * (forward_flops(cfg, rows, T) + forward_flops(cfg, rows, T, lm_head=False))
    return generate_flops(cfg, rows, prompt_len, new_tokens) + scoring + update


# -- memory ---------------------------------------------------------------------------------


def host_peak_bytes() -> int:
    """This process's peak resident set (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def jax_peak_memory(device) -> tuple[int, str]:
    """(bytes, what): the device allocator's peak where it keeps one (GPU, TPU), else the
    process's peak RSS."""
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if stats and "peak_bytes_in_use" in stats:
        return int(stats["peak_bytes_in_use"]), "device"
    return host_peak_bytes(), "host RSS"


def torch_peak_memory(device) -> tuple[int, str]:
    import torch

    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "device"
    return host_peak_bytes(), "host RSS"


# -- our steps ------------------------------------------------------------------------------


def jax_train_runner(kind: str, model, params, mesh, batch: dict) -> Callable[[], None]:
    """run(): one compiled SFT or DPO step (RMSprop, as the paper's code), blocking until
    its loss is on the host side of the device. DPO's reference is the initial policy."""
    import jax

    objective = SFT() if kind == "sft" else DPO(beta=BETA)
    tx, sched = make_optimizer(name="rmsprop", learning_rate=1e-6, clip_norm=CLIP_NORM)
    holder = {"state": create_state(jax.tree.map(lambda x: x.copy(), params), tx, 0)}
    ref = params if objective.needs_reference else None
    step = jax.jit(make_train_step(objective, model, tx, sched, 1), donate_argnums=(0,))
    dev_batch = shd.shard_batch(batch, mesh)

    def run():
        holder["state"], m = step(holder["state"], dev_batch, ref)
        jax.block_until_ready(m["loss"])

    return run


def ppo_trainer(cfg, layout, rollout_batch, mini_batch, epochs, prompt_len, new_tokens, value_model, seed: int = 0):
    """(trainer, state): a PPOTrainer on random weights of `cfg` (policy, reference and
    reward model; a "separate" or "shared" value model)."""
    import jax
    import jax.numpy as jnp

    config = PPOConfig(
        rollout_batch_size=rollout_batch,
        mini_batch_size=mini_batch,
        ppo_epochs=epochs,
        max_new_tokens=new_tokens,
        max_prompt_length=prompt_len,
        value_model=value_model,
    )
    policy = init_params(build_model(cfg, layout=layout), jax.random.key(seed))
    rm_model = build_model(cfg, lm_head=False, scalar_heads=(SCORE_HEAD,), layout=layout)
    rm_params = init_params(rm_model, jax.random.key(seed + 1))
    params = {"policy": policy}
    if config.value_model == "separate":
        critic = build_model(cfg, lm_head=False, scalar_heads=(VALUE_HEAD,), layout=layout)
        params["value"] = dict(init_params(critic, jax.random.key(seed + 2)))
    else:
        params["policy"][head_param(VALUE_HEAD)] = init_scalar_head(cfg, jax.random.key(seed + 2), layout)
    tx, _ = make_optimizer(learning_rate=1e-6)
    trainer = PPOTrainer(
        cfg,
        config,
        tx,
        layout,
        jax.tree.map(jnp.copy, policy),
        rm_model,
        rm_params,
        None,
        eos_ids=(),
        pad_id=0,
        kl=KLController(0.05),
    )
    return trainer, init_state(params, tx, 0, trainer.initial_extra())


# -- PyTorch peers --------------------------------------------------------------------------


def torch_device():
    """CUDA where torch sees it, else the CPU with every core."""
    import torch

    if torch.cuda.is_available():
        return torch.device("cuda")
    torch.set_num_threads(os.cpu_count())
    return torch.device("cpu")


def torch_sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def load_torch(path: str, dtype, device, trunk: bool = False):
    """transformers' Llama (SDPA attention) from an HF directory; `trunk`: the decoder
    without its LM head plus a scalar head, as our value and reward models."""
    import torch
    import transformers

    cls = transformers.AutoModel if trunk else transformers.AutoModelForCausalLM
    m = cls.from_pretrained(path, dtype=dtype, attn_implementation="sdpa").to(device)
    if trunk:
        m.scalar_head = torch.nn.Linear(m.config.hidden_size, 1, device=device, dtype=dtype)
    return m


def _autocast(device, dtype):
    import torch

    return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)


def _token_logps(model, toks, device, dtype):
    """Per-token log-probs of toks[:, 1:] (float32), as our objectives compute them."""
    import torch

    with _autocast(device, dtype):
        logits = model(toks).logits
    return torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, toks[:, 1:, None])[..., 0]


def _scalar(model, toks, device, dtype):
    with _autocast(device, dtype):
        h = model(toks).last_hidden_state
        return model.scalar_head(h)[..., 0].float()


def torch_train_runner(kind: str, path: str, batch: dict, dtype, device) -> Callable[[], None]:
    """The same SFT / DPO step in PyTorch: float32 params, `dtype` autocast, RMSprop, clip."""
    import torch

    policy = load_torch(path, torch.float32, device).train()
    opt = torch.optim.RMSprop(policy.parameters(), lr=1e-6)
    if kind == "sft":
        toks = torch.tensor(batch["tokens"], dtype=torch.long, device=device)
        mask = torch.tensor(batch["loss_mask"], device=device)[:, 1:]
        ref_model = None
    else:
        toks = torch.tensor(
            np.concatenate([batch["chosen_tokens"], batch["rejected_tokens"]]), dtype=torch.long, device=device
        )
        mask = torch.tensor(np.concatenate([batch["chosen_loss_mask"], batch["rejected_loss_mask"]]), device=device)
        mask = mask[:, 1:]
        ref_model = load_torch(path, torch.float32, device).eval()
    pairs = toks.shape[0] // 2

    def run():
        opt.zero_grad()
        lp = (_token_logps(policy, toks, device, dtype) * mask).sum(-1)
        if ref_model is None:
            loss = -lp.mean()
        else:
            with torch.no_grad():
                rlp = (_token_logps(ref_model, toks, device, dtype) * mask).sum(-1)
            h = (lp[:pairs] - lp[pairs:]) - (rlp[:pairs] - rlp[pairs:])
            loss = -torch.nn.functional.logsigmoid(BETA * h).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), CLIP_NORM)
        opt.step()
        torch_sync(device)

    return run


def torch_generate(model, prompts, new_tokens: int, sample: bool = False):
    """Exactly new_tokens per row (no early stop), greedy unless `sample` (temperature 1)."""
    import torch

    kw = dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0) if sample else dict(do_sample=False)
    return model.generate(
        prompts,
        attention_mask=torch.ones_like(prompts),
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        pad_token_id=0,
        **kw,
    )


def torch_ppo_runner(path: str, prompts: np.ndarray, new_tokens: int, mini_batch: int, epochs: int, dtype, device):
    """One PPO iteration in PyTorch doing our PPOTrainer's work on the same shapes: sample
    (temperature 1), score with policy, reference, value and reward models, GAE (gamma 1,
    lambda 0.95) on a k1 KL penalty, then `epochs` passes of clipped policy and value
    losses over shuffled mini-batches (AdamW on both, float32 params, `dtype` autocast)."""
    import torch

    policy = load_torch(path, torch.float32, device)
    ref = load_torch(path, torch.float32, device).eval()
    value = load_torch(path, torch.float32, device, trunk=True)
    reward = load_torch(path, torch.float32, device, trunk=True).eval()
    opt = torch.optim.AdamW([*policy.parameters(), *value.parameters()], lr=1e-6, weight_decay=0.0)
    p_ids = torch.tensor(prompts, dtype=torch.long, device=device)
    B, P = p_ids.shape
    gen = torch.Generator(device="cpu").manual_seed(0)

    def run():
        with torch.no_grad():
            policy.eval()
            with _autocast(device, dtype):
                seq = torch_generate(policy, p_ids, new_tokens, sample=True)
            resp = slice(P - 1, None)  # log-probs and values that score the response tokens
            old_lp = _token_logps(policy, seq, device, dtype)[:, resp]
            ref_lp = _token_logps(ref, seq, device, dtype)[:, resp]
            old_v = _scalar(value, seq, device, dtype)[:, P - 1 : -1]
            score = _scalar(reward, seq, device, dtype)[:, -1]
            rewards = -0.05 * (old_lp - ref_lp)
            rewards[:, -1] += score
            adv = torch.zeros_like(rewards)
            last = torch.zeros(B, device=device)
            for t in reversed(range(new_tokens)):
                nxt = old_v[:, t + 1] if t + 1 < new_tokens else torch.zeros(B, device=device)
                last = rewards[:, t] + nxt - old_v[:, t] + 0.95 * last
                adv[:, t] = last
            returns = adv + old_v
            adv = (adv - adv.mean()) / (adv.std() + 1e-8)
        policy.train()
        value.train()
        for _ in range(epochs):
            for idx in torch.randperm(B, generator=gen).split(mini_batch):
                idx = idx.to(device)
                lp = _token_logps(policy, seq[idx], device, dtype)[:, resp]
                ratio = torch.exp(lp - old_lp[idx])
                pg = torch.max(-adv[idx] * ratio, -adv[idx] * ratio.clamp(0.8, 1.2)).mean()
                v = _scalar(value, seq[idx], device, dtype)[:, P - 1 : -1]
                v_clip = old_v[idx] + (v - old_v[idx]).clamp(-0.2, 0.2)
                vf = 0.5 * torch.max((v - returns[idx]) ** 2, (v_clip - returns[idx]) ** 2).mean()
                opt.zero_grad()
                (pg + 0.1 * vf).backward()
                torch.nn.utils.clip_grad_norm_([*policy.parameters(), *value.parameters()], 1.0)
                opt.step()
        torch_sync(device)

    return run
