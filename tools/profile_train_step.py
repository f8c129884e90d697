#!/usr/bin/env python
"""Where an SFT step's time goes: the forward (loss) alone, and forward + backward
(value_and_grad), ours compiled and PyTorch eager on the same shapes, float32; with XLA's
cost analysis of each compiled program. Run it under different XLA_FLAGS or --remat /
--no_scan to compare variants.

  python tools/profile_train_step.py --preset small --batch 4 --seq_len 256
  XLA_FLAGS=--xla_cpu_multi_thread_eigen=false python tools/profile_train_step.py --preset tiny
  python tools/profile_train_step.py --preset small --layers 1   # vs --layers 2: one layer, the rest
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np

from rlaif_jax.models.presets import PRESETS, median_seconds, preset_config


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq_len", type=int, default=256)
    ap.add_argument("--remat", choices=["none", "full", "dots"], default="none")
    ap.add_argument("--no_scan", action="store_true", help="unrolled layers instead of a scan")
    ap.add_argument("--layers", type=int, default=None, help="override num_layers (1 vs 2: per layer and head)")
    ap.add_argument("--attention_impl", default="auto")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--no_torch", action="store_true")
    args = ap.parse_args()

    import jax
    import jax.numpy as jnp

    from rlaif_jax.models import apply, build_model, init_params

    layers = {"num_layers": args.layers} if args.layers else {}
    cfg = preset_config(
        args.preset, remat_policy=args.remat, scan_layers=not args.no_scan, attention_impl=args.attention_impl, **layers
    )
    model = build_model(cfg)
    params = init_params(model, jax.random.key(0))
    rs = np.random.RandomState(0)
    toks = jnp.asarray(rs.randint(3, cfg.vocab_size, (args.batch, args.seq_len)).astype(np.int32))

    def loss(p, t):
        logits = apply(model, p, t)["logits"].astype(jnp.float32)
        lp = jnp.take_along_axis(jax.nn.log_softmax(logits[:, :-1]), t[:, 1:, None], -1)[..., 0]
        return -lp.sum(-1).mean()

    out = {"preset": args.preset, "batch": args.batch, "seq_len": args.seq_len, "remat": args.remat}
    out.update(scan=not args.no_scan, layers=cfg.num_layers, attention_impl=args.attention_impl)
    out["xla_flags"] = os.environ.get("XLA_FLAGS", "")
    for name, fn in (("fwd", loss), ("fwd_bwd", jax.value_and_grad(loss))):
        compiled = jax.jit(fn).lower(params, toks).compile()
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        out[f"jax_{name}_s"] = median_seconds(lambda c=compiled: jax.block_until_ready(c(params, toks)), args.repeats)
        out[f"jax_{name}_gflop"] = float(cost.get("flops", 0.0)) / 1e9
    if not args.no_torch:
        import torch
        import transformers

        torch.set_num_threads(os.cpu_count())
        torch.manual_seed(0)
        hf = transformers.LlamaForCausalLM(cfg.to_hf())
        tt = torch.tensor(np.asarray(toks), dtype=torch.long)

        def tloss():
            lp = torch.log_softmax(hf(tt).logits[:, :-1].float(), -1).gather(-1, tt[:, 1:, None])[..., 0]
            return -lp.sum(-1).mean()

        with torch.no_grad():
            out["torch_fwd_s"] = median_seconds(tloss, args.repeats)

        def fb():
            hf.zero_grad()
            tloss().backward()

        out["torch_fwd_bwd_s"] = median_seconds(fb, args.repeats)
    for fw in ("jax", "torch"):
        if f"{fw}_fwd_s" in out:
            out[f"{fw}_bwd_over_fwd"] = (out[f"{fw}_fwd_bwd_s"] - out[f"{fw}_fwd_s"]) / out[f"{fw}_fwd_s"]
    print(json.dumps(out))


if __name__ == "__main__":
    main()
