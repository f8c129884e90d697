#!/usr/bin/env python
"""Time per PPO iteration, split into rollout (sampling), scoring (policy, reference, value
and reward forward passes, advantages) and update (ppo_epochs x mini-batches), and the
rollout's tokens/s, on a random-weight model of a given shape.

  python tools/benchmark_ppo.py --preset tiny
  python tools/benchmark_ppo.py --preset small --rollout_batch 64 --new_tokens 128 --dtype bfloat16
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from rlaif_jax.models.presets import PRESETS, preset_config


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    ap.add_argument("--rollout_batch", type=int, default=16)
    ap.add_argument("--mini_batch", type=int, default=8)
    ap.add_argument("--ppo_epochs", type=int, default=2)
    ap.add_argument("--prompt_len", type=int, default=64)
    ap.add_argument("--new_tokens", type=int, default=64)
    ap.add_argument("--value_model", choices=["separate", "shared"], default="separate")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--iterations", type=int, default=3, help="timed iterations after one warm-up")
    args = ap.parse_args()

    import jax

    from rlaif_jax import sharding as shd
    from rlaif_jax.benchmarks import ppo_trainer
    from rlaif_jax.train.ppo import PromptStream, metrics_row

    cfg = preset_config(args.preset, dtype=args.dtype, eos_token_id=None)
    mesh = shd.make_mesh(-1, 1, 1)
    layout = shd.Layout(mesh, shd.logical_rules())
    trainer, state = ppo_trainer(
        cfg,
        layout,
        args.rollout_batch,
        args.mini_batch,
        args.ppo_epochs,
        args.prompt_len,
        args.new_tokens,
        args.value_model,
    )
    rs = np.random.RandomState(0)
    prompts = [
        list(rs.randint(3, cfg.vocab_size, rs.randint(args.prompt_len // 2, args.prompt_len + 1)))
        for _ in range(4 * args.rollout_batch)
    ]
    stream = PromptStream(prompts, args.rollout_batch, 1, args.prompt_len, 0)
    t = time.perf_counter()
    state, m = trainer.iteration(state, shd.shard_batch(next(stream), mesh))
    metrics_row(m)
    compile_s = time.perf_counter() - t
    rows = []
    for _ in range(args.iterations):
        state, m = trainer.iteration(state, shd.shard_batch(next(stream), mesh))
        rows.append(metrics_row(m))
    mean = {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}
    total = mean["time/rollout"] + mean["time/scoring"] + mean["time/update"]
    dev = jax.devices()[0]
    print(
        f"device: {dev.device_kind} x{jax.device_count()}  params: {cfg.num_params() / 1e6:.1f}M (x3 models + ref)  "
        f"dtype {args.dtype}  value model: {args.value_model}"
    )
    print(
        f"rollout batch {args.rollout_batch} prompts x <= {args.prompt_len} tokens, {args.new_tokens} new tokens; "
        f"{args.ppo_epochs} epochs of mini-batches of {args.mini_batch}"
    )
    print(f"first iteration (compile + run): {compile_s:.1f} s")
    print(f"{'phase':10s} {'seconds':>9s} {'share':>7s}")
    for phase in ("rollout", "scoring", "update"):
        print(f"{phase:10s} {mean['time/' + phase]:9.3f} {100 * mean['time/' + phase] / total:6.1f}%")
    print(f"{'total':10s} {total:9.3f}")
    print(
        f"rollout tokens/s: {mean['rollout_tokens_per_second']:.1f}  "
        f"(iteration tokens/s incl. scoring and update: {args.rollout_batch * args.new_tokens / total:.1f})"
    )


if __name__ == "__main__":
    main()
