#!/usr/bin/env python
"""Tokens/s and MFU of the compiled SFT and DPO train steps, beside the same steps in
PyTorch (transformers LlamaForCausalLM + torch.optim.RMSprop, as the paper's code) on the
same model and weights, in the same run.

  python tools/benchmark_train.py --preset tiny
  python tools/benchmark_train.py --preset small --batch 8 --seq_len 512 --dtype bfloat16

MFU is printed where the device's peak is known (TPU / NVIDIA) or given with --peak_tflops;
on CPUs it is "n/a". Peak memory: the device's allocator peak where it reports one, and the
process's peak RSS (both frameworks) otherwise.
"""

from __future__ import annotations

import argparse
import tempfile

import numpy as np

from rlaif_jax.models.presets import PRESETS, median_seconds, preset_config


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

    from rlaif_jax import benchmarks as bm
    from rlaif_jax import sharding as shd
    from rlaif_jax.models import build_model
    from rlaif_jax.models.hf_io import load_hf
    from rlaif_jax.train.metrics import mfu, peak_tflops

    hc = preset_config(args.preset).to_hf()
    torch.manual_seed(0)
    tmp = tempfile.TemporaryDirectory()
    transformers.LlamaForCausalLM(hc).save_pretrained(tmp.name)
    mesh = shd.make_mesh(-1, 1, 1)
    layout = shd.Layout(mesh, shd.logical_rules())
    cfg, params = load_hf(tmp.name, layout=layout, dtype=args.dtype, param_dtype="float32", remat_policy=args.remat)
    model = build_model(cfg, layout=layout)
    B, T = args.batch, args.seq_len
    rs = np.random.RandomState(0)
    peak = peak_tflops(jax.devices()[0], args.peak_tflops)
    tdev = bm.torch_device()
    results = []

    for name, n_rows in (("sft", B), ("dpo", 2 * B)):
        batch = bm.train_batch(name, rs, B, T, cfg.vocab_size)
        t = median_seconds(bm.jax_train_runner(name, model, params, mesh, batch), args.repeats)
        tokens = n_rows * T
        flops = bm.train_flops(cfg, name, n_rows, T)
        row = {"step": name, "jax_tok_s": tokens / t, "jax_step_s": t, "mfu": mfu(flops, t, jax.device_count(), peak)}
        if not args.no_torch:
            run = bm.torch_train_runner(name, tmp.name, batch, getattr(torch, args.dtype), tdev)
            tt = median_seconds(run, args.repeats)
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
    peak_bytes, kind = bm.jax_peak_memory(dev)
    if kind == "device":
        print(f"peak device memory: {peak_bytes / 2**30:.2f} GiB")
    print(f"peak host RSS (both frameworks): {bm.host_peak_bytes() / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
