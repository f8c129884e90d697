#!/usr/bin/env python
"""Tokens/s and MFU of the compiled SFT and DPO train steps, beside the same steps in
PyTorch (transformers LlamaForCausalLM + torch.optim.RMSprop, as the paper's code) on the
same model and weights, in the same run.

  python scripts/benchmark_train.py --preset tiny
  python scripts/benchmark_train.py --preset small --batch 8 --seq_len 512 --dtype bfloat16

MFU is printed where the device's peak is known (TPU / NVIDIA) or given with --peak_tflops;
on CPUs it is "n/a". Peak memory: the device's allocator peak where it reports one, and the
process's peak RSS (both frameworks) otherwise.
"""

from __future__ import annotations

import argparse
import os
import resource
import tempfile

import numpy as np

from rlaif_jax.models.presets import PRESETS, median_seconds, preset_config


def make_batch(rs, batch, seq_len, vocab, prefix=""):
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


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    ap.add_argument("--batch", type=int, default=4, help="SFT sequences / DPO pairs per step")
    ap.add_argument("--seq_len", type=int, default=256)
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--remat", choices=["none", "full", "dots"], default="none")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--peak_tflops", type=float, default=None)
    ap.add_argument("--no_torch", action="store_true")
    args = ap.parse_args()

    import jax
    import torch
    import transformers

    from rlaif_jax import sharding as shd
    from rlaif_jax.models import build_model
    from rlaif_jax.models.hf_io import load_hf
    from rlaif_jax.train import DPO, SFT, create_state, make_optimizer, make_train_step
    from rlaif_jax.train.metrics import mfu, peak_tflops

    torch.set_num_threads(os.cpu_count())
    hc = preset_config(args.preset).to_hf()
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(hc)
    tmp = tempfile.TemporaryDirectory()
    hf.save_pretrained(tmp.name)
    mesh = shd.make_mesh(-1, 1, 1)
    layout = shd.Layout(mesh, shd.logical_rules())
    cfg, params = load_hf(tmp.name, layout=layout, dtype=args.dtype, param_dtype="float32", remat_policy=args.remat)
    model = build_model(cfg, layout=layout)
    B, T = args.batch, args.seq_len
    rs = np.random.RandomState(0)
    peak = peak_tflops(jax.devices()[0], args.peak_tflops)
    results = []

    for name, objective, n_rows, fwd_mult in (("sft", SFT(), B, 1), ("dpo", DPO(beta=0.1), 2 * B, 2)):
        tx, sched = make_optimizer(name="rmsprop", learning_rate=1e-6, clip_norm=10.0)
        state = create_state(jax.tree.map(lambda x: x.copy(), params), tx, 0)
        ref = params if objective.needs_reference else None
        step = jax.jit(make_train_step(objective, model, tx, sched, 1, mesh), donate_argnums=(0,))
        if name == "sft":
            batch = make_batch(rs, B, T, cfg.vocab_size)
        else:
            batch = {
                **make_batch(rs, B, T, cfg.vocab_size, "chosen_"),
                **make_batch(rs, B, T, cfg.vocab_size, "rejected_"),
            }
        dev_batch = shd.shard_batch(batch, mesh)
        holder = {"state": state}

        def run():
            holder["state"], m = step(holder["state"], dev_batch, ref)
            jax.block_until_ready(m["loss"])

        t = median_seconds(run, args.repeats)
        tokens = n_rows * T
        # Policy forward+backward = 6N flops per token; a reference forward adds 2N.
        flops = tokens * cfg.flops_per_token(T) * (1 + (1 / 3 if fwd_mult == 2 else 0))
        row = {"step": name, "jax_tok_s": tokens / t, "jax_step_s": t, "mfu": mfu(flops, t, jax.device_count(), peak)}

        if not args.no_torch:
            dt = torch.bfloat16 if args.dtype == "bfloat16" else torch.float32
            policy = transformers.LlamaForCausalLM.from_pretrained(tmp.name, dtype=torch.float32).train()
            opt = torch.optim.RMSprop(policy.parameters(), lr=1e-6)
            ref_model = (
                transformers.LlamaForCausalLM.from_pretrained(tmp.name, dtype=torch.float32).eval()
                if name == "dpo"
                else None
            )

            def seq_logps(m, toks, mask):
                with torch.autocast("cpu", dtype=dt, enabled=dt != torch.float32):
                    logits = m(toks).logits.float()
                lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, toks[:, 1:, None])[..., 0]
                return (lp * mask[:, 1:]).sum(-1), mask[:, 1:].sum()

            if name == "sft":
                toks = torch.tensor(batch["tokens"], dtype=torch.long)
                mask = torch.tensor(batch["loss_mask"])

                def torch_step():
                    opt.zero_grad()
                    lp, _ = seq_logps(policy, toks, mask)
                    loss = -lp.mean()
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(policy.parameters(), 10.0)
                    opt.step()
            else:
                toks = torch.tensor(
                    np.concatenate([batch["chosen_tokens"], batch["rejected_tokens"]]), dtype=torch.long
                )
                mask = torch.tensor(np.concatenate([batch["chosen_loss_mask"], batch["rejected_loss_mask"]]))

                def torch_step():
                    opt.zero_grad()
                    lp, _ = seq_logps(policy, toks, mask)
                    with torch.no_grad():
                        rlp, _ = seq_logps(ref_model, toks, mask)
                    h = (lp[:B] - lp[B:]) - (rlp[:B] - rlp[B:])
                    loss = -torch.nn.functional.logsigmoid(0.1 * h).mean()
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(policy.parameters(), 10.0)
                    opt.step()

            tt = median_seconds(torch_step, args.repeats)
            row.update(torch_tok_s=tokens / tt, torch_step_s=tt)
        results.append(row)

    dev = jax.devices()[0]
    print(
        f"device: {dev.device_kind} x{jax.device_count()}  params: {cfg.num_params() / 1e6:.1f}M  "
        f"batch {B} x {T}  dtype {args.dtype}  remat {args.remat}"
    )
    print(f"{'step':5s} {'rlaif_jax tok/s':>16s} {'torch tok/s':>12s} {'ratio':>6s} {'MFU':>8s}")
    for r in results:
        ratio = f"{r['jax_tok_s'] / r['torch_tok_s']:6.2f}" if "torch_tok_s" in r else "   n/a"
        torch_s = f"{r['torch_tok_s']:12.1f}" if "torch_tok_s" in r else f"{'n/a':>12s}"
        m = f"{100 * r['mfu']:7.1f}%" if r["mfu"] is not None else "     n/a"
        print(f"{r['step']:5s} {r['jax_tok_s']:16.1f} {torch_s} {ratio} {m}")
    print("(DPO tokens count chosen + rejected; both frameworks run a reference forward in the step)")
    stats = dev.memory_stats() if hasattr(dev, "memory_stats") else None
    if stats and "peak_bytes_in_use" in stats:
        print(f"peak device memory: {stats['peak_bytes_in_use'] / 2**30:.2f} GiB")
    print(f"peak host RSS (both frameworks): {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")


if __name__ == "__main__":
    main()
