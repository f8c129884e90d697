#!/usr/bin/env python
"""Forward and generation throughput of the JAX decoder beside HF transformers (PyTorch) on
the same config and weights, in the same run.

  python tools/benchmark_model.py --preset small
  python tools/benchmark_model.py --preset tiny-moe --moe_impl dense
  python tools/benchmark_model.py --hf_dir /path/to/Llama-2-7b-hf --dtype bfloat16 --batch 8

Prints tokens/s for both, their ratio, MFU where the device's peak is known (or given with
--peak_tflops), and peak memory.
"""

from __future__ import annotations

import argparse
import os
import resource
import tempfile

import numpy as np

from rlaif_jax.models.presets import PRESETS, median_seconds, preset_config


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="tiny", help="model shape (random weights)")
    ap.add_argument("--hf_dir", help="benchmark this local HF checkpoint instead of a preset")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq_len", type=int, default=256, help="forward sequence length")
    ap.add_argument("--prompt_len", type=int, default=64)
    ap.add_argument("--new_tokens", type=int, default=64)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--sliding_window", type=int, default=None, help="presets: a Mistral sliding window of this many tokens"
    )
    ap.add_argument(
        "--attention_impl",
        default=None,
        help="DecoderConfig.attention_impl for the forward (default: the config's, 'auto')",
    )
    ap.add_argument("--decode_block", type=int, default=None, help="DecoderConfig.decode_block (default: the config's)")
    ap.add_argument("--peak_tflops", type=float, default=None, help="device peak for MFU if not known")
    ap.add_argument(
        "--torch_threads",
        type=int,
        default=0,
        help="PyTorch intra-op threads (0: every core; on a loaded machine 1 avoids spin-waiting)",
    )
    ap.add_argument("--no_torch", action="store_true", help="skip the PyTorch reference")
    ap.add_argument(
        "--moe_impl",
        choices=["ragged", "dense"],
        default=None,
        help="MoE experts implementation (MoE models; default: the config's)",
    )
    args = ap.parse_args()

    import jax
    import jax.numpy as jnp

    from rlaif_jax.benchmarks import interleaved_medians, torch_generate
    from rlaif_jax.models import apply, build_model
    from rlaif_jax.models.hf_io import load_hf
    from rlaif_jax.sampling import SamplingParams, generate
    from rlaif_jax.train.metrics import peak_tflops

    torch = None
    hf_model = None
    tmp = None
    if not args.no_torch:
        import torch
        import transformers

        torch.set_num_threads(args.torch_threads or os.cpu_count())
    if args.hf_dir:
        path = args.hf_dir
        if torch is not None:
            hf_model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, args.dtype)).eval()
    else:
        if torch is None:
            raise SystemExit("presets build their random weights with transformers+torch; drop --no_torch")
        window = {} if args.sliding_window is None else {"sliding_window": args.sliding_window, "model_type": "mistral"}
        hc = preset_config(args.preset, **window).to_hf()
        torch.manual_seed(0)
        hf_model = transformers.AutoModelForCausalLM.from_config(hc).eval()
        tmp = tempfile.TemporaryDirectory()
        path = tmp.name
        hf_model.save_pretrained(path)
        hf_model = hf_model.to(getattr(torch, args.dtype))

    overrides = {} if args.moe_impl is None else {"moe_impl": args.moe_impl}
    if args.decode_block is not None:
        overrides["decode_block"] = args.decode_block
    if args.attention_impl is not None:
        overrides["attention_impl"] = args.attention_impl
    cfg, params = load_hf(path, dtype=args.dtype, param_dtype=args.dtype, **overrides)
    model = build_model(cfg)
    dev = jax.devices()[0]
    rs = np.random.RandomState(0)
    B, T = args.batch, args.seq_len
    ids = rs.randint(3, cfg.vocab_size, (B, T)).astype(np.int32)
    fwd = jax.jit(lambda p, t: apply(model, p, t)["logits"])
    ids_dev = jnp.asarray(ids)
    fwd_fns = {"jax": lambda: fwd(params, ids_dev).block_until_ready()}
    if hf_model is not None:
        t_ids = torch.tensor(ids, dtype=torch.long)

        def torch_fwd():
            with torch.inference_mode():
                return hf_model(t_ids).logits

        fwd_fns["torch"] = torch_fwd
    # Interleaved: the two frameworks' repetitions alternate, so a shared machine's load
    # falls on both alike.
    fwd_times = interleaved_medians(fwd_fns, args.repeats)
    t_jax = fwd_times["jax"]
    n_params = cfg.num_params()
    n_active = cfg.num_params(active=True)  # MoE: the experts a token is routed to
    fwd_flops = B * T * (2 * n_active + 2 * cfg.num_layers * cfg.num_heads * cfg.head_dim * T)
    peak = peak_tflops(dev, args.peak_tflops)
    print(
        f"device: {dev.device_kind} x{jax.device_count()}  backend: {jax.default_backend()}  "
        f"params: {n_params / 1e6:.1f}M"
        + (
            f" ({n_active / 1e6:.1f}M active, {cfg.num_experts} experts, "
            f"top-{cfg.num_experts_per_tok}, moe_impl {cfg.moe_impl})"
            if cfg.is_moe
            else ""
        )
        + f"  dtype: {args.dtype}"
    )
    rows = []
    fwd_tps = B * T / t_jax
    mfu = f"{100 * fwd_flops / t_jax / (peak * 1e12):.1f}%" if peak else "n/a (peak unknown)"
    rows.append(("forward", fwd_tps))

    prompts = [list(rs.randint(3, cfg.vocab_size, args.prompt_len)) for _ in range(B)]
    sp = SamplingParams(max_new_tokens=args.new_tokens, temperature=0.0, eos_ids=())
    key = jax.random.key(0)
    t_gen = median_seconds(lambda: generate(model, params, prompts, key, sp), args.repeats)
    gen_tps = B * args.new_tokens / t_gen
    rows.append(("generate", gen_tps))

    torch_rows = {}
    if hf_model is not None:
        t_fwd = fwd_times["torch"]
        with torch.inference_mode():
            p_ids = torch.tensor(np.array(prompts), dtype=torch.long)
            t_tgen = median_seconds(lambda: torch_generate(hf_model, p_ids, args.new_tokens), args.repeats)
        torch_rows = {"forward": B * T / t_fwd, "generate": B * args.new_tokens / t_tgen}

    print(f"\n{'':10s} {'rlaif_jax tok/s':>16s} {'HF torch tok/s':>16s} {'ratio':>7s}")
    for name, tps in rows:
        ref = torch_rows.get(name)
        print(
            f"{name:10s} {tps:16.1f} {'' if ref is None else f'{ref:16.1f}':>16} "
            f"{'' if ref is None else f'{tps / ref:7.2f}'}"
        )
    print(f"\nforward: batch {B} x {T} tokens, attention {cfg.attention_impl}, MFU {mfu}")
    print(f"generate: batch {B}, prompt {args.prompt_len}, {args.new_tokens} new tokens (greedy, no early stop)")
    stats = dev.memory_stats() if hasattr(dev, "memory_stats") else None
    if stats and "peak_bytes_in_use" in stats:
        print(f"peak device memory: {stats['peak_bytes_in_use'] / 2**30:.2f} GiB")
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"peak host RSS (both frameworks, this process): {rss:.2f} GiB")


if __name__ == "__main__":
    main()
