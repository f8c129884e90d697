#!/usr/bin/env python
"""Samples-stage throughput on random weights: K samples of every prompt, the static sampler
called once per sample (what the stages do today), K samples sharing one prefill
(sampling.generate_samples), continuous batching (SamplingParams.slots), the two combined
(generate_samples with slots: one prefill per prompt feeding K decode slots) and HF generate
(PyTorch), repetitions interleaved in one process.

  python tools/benchmark_sampler.py --preset tiny --samples 1 4 --lengths miniature chat
  python tools/benchmark_sampler.py --preset small --samples 4 --lengths chat

Lengths: a random model's stops are set by how many token ids count as EOS (each step stops
with probability |eos| / vocab: geometric lengths of the given mean, cut at the budget).
'miniature': 16-token prompts, 48 new tokens at most, mean 16 (the miniature's 64-token
samples); 'chat': prompts of 8-96 tokens, 160 new tokens at most, mean 40 (a long tail).
Prints generated tokens/s (sum of the samples' lengths over the median wall time).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tempfile

import numpy as np

from rlaif_jax.models.config import KV_ROW_WRITES
from rlaif_jax.models.presets import PRESETS, preset_config

LENGTHS = {
    # name: (prompt length low, high), max new tokens, mean generated tokens
    "miniature": ((16, 16), 48, 16),
    "chat": ((8, 96), 160, 40),
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    ap.add_argument("--prompts", type=int, default=16, help="prompts per stage batch")
    ap.add_argument("--samples", type=int, nargs="+", default=[1, 4], help="K samples per prompt")
    ap.add_argument("--lengths", nargs="+", choices=sorted(LENGTHS), default=["miniature", "chat"])
    ap.add_argument(
        "--slots",
        type=int,
        nargs="+",
        default=[0],
        help="continuous batching slots (default: --prompts); several: one shared+cont variant each",
    )
    ap.add_argument(
        "--no_shrink",
        action="store_true",
        help="also run shared+cont at the first --slots without the tail's shrinking (generate_rows min_slots=slots)",
    )
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--torch_threads",
        type=int,
        default=0,
        help="PyTorch intra-op threads (0: every core; on a loaded machine 1 avoids spin-waiting)",
    )
    ap.add_argument("--no_torch", action="store_true")
    ap.add_argument(
        "--variants",
        nargs="+",
        choices=["shared", "continuous", "shared+cont"],
        help="JAX variants beside today's (default: all)",
    )
    ap.add_argument(
        "--row_write",
        choices=KV_ROW_WRITES,
        default="auto",
        help="DecoderConfig.kv_row_write: how continuous batching writes each row's new key (an ablation)",
    )
    args = ap.parse_args(argv)

    import jax
    import jax.numpy as jnp

    from rlaif_jax.benchmarks import interleaved_medians
    from rlaif_jax.models import build_model, init_params
    from rlaif_jax.sampling import (
        SamplingParams,
        generate,
        generate_continuous,
        generate_rows,
        generate_samples,
        row_keys,
    )

    cfg = dataclasses.replace(preset_config(args.preset), kv_row_write=args.row_write)
    hf = None
    if not args.no_torch:
        import torch
        import transformers

        from rlaif_jax.models.hf_io import load_hf

        torch.set_num_threads(args.torch_threads or os.cpu_count())
        torch.manual_seed(0)
        hf = transformers.AutoModelForCausalLM.from_config(cfg.to_hf()).eval()
        with tempfile.TemporaryDirectory() as d:
            hf.save_pretrained(d)
            cfg, params = load_hf(d)
    model = build_model(cfg)
    if hf is None:
        params = init_params(model, jax.random.key(0))
    rs = np.random.RandomState(0)
    print(
        f"preset {args.preset}: {cfg.num_params() / 1e6:.1f}M params, {args.prompts} prompts, "
        f"row write {args.row_write}, jax {jax.__version__}"
    )
    print(f"{'lengths':10s} {'K':>2s} {'variant':22s} {'tok/s':>9s} {'x today':>8s} {'tokens':>7s}")
    for lname in args.lengths:
        (lo, hi), new, mean = LENGTHS[lname]
        prompts = [list(rs.randint(3 + 512, cfg.vocab_size, rs.randint(lo, hi + 1))) for _ in range(args.prompts)]
        eos = tuple(range(3, 3 + max(1, round(cfg.vocab_size / mean))))
        sp = SamplingParams(max_new_tokens=new, temperature=1.0, eos_ids=eos, rng_per_prompt=True)
        for K in args.samples:
            keys = [jax.random.key(1000 * k) for k in range(K)]
            made = {}

            def today(keys=keys, prompts=prompts, sp=sp):
                made["today"] = sum(int(generate(model, params, prompts, k, sp).lengths.sum()) for k in keys)

            def shared(keys=keys, prompts=prompts, sp=sp):
                made["shared prefill"] = sum(
                    int(o.lengths.sum()) for o in generate_samples(model, params, prompts, keys, sp)
                )

            slots = args.slots[0] or args.prompts

            def continuous(keys=keys, prompts=prompts, sp=sp):
                # The K samples as one call of K x prompts through `slots` slots.
                # Per-row keys: the same samples as the other variants.
                rows = jnp.concatenate([row_keys(k, len(prompts)) for k in keys])
                made[f"continuous ({slots} slots)"] = int(
                    generate_continuous(model, params, prompts * len(keys), rows, sp, slots).lengths.sum()
                )

            def combined(keys=keys, prompts=prompts, sp=sp):
                # One prefill per prompt feeding its K rows inside continuous batching
                # (generate_samples with SamplingParams.slots).
                spc = dataclasses.replace(sp, slots=slots)
                made[f"shared+cont ({slots} sl)"] = sum(
                    int(o.lengths.sum()) for o in generate_samples(model, params, prompts, keys, spc)
                )

            def combined_at(n, min_slots=None, name=None, keys=keys, prompts=prompts, sp=sp):
                # generate_samples with slots=n, spelled out to reach generate_rows' min_slots.
                def run():
                    B, K = len(prompts), len(keys)
                    per = jnp.stack([row_keys(k, B) for k in keys], axis=1).reshape(B * K)
                    out = generate_rows(
                        model, params, prompts, np.repeat(np.arange(B), K), per, sp, n, min_slots=min_slots
                    )
                    made[name] = int(out.lengths.sum())

                return run

            fns = {
                "today": today,
                "shared prefill": shared,
                f"continuous ({slots} slots)": continuous,
                f"shared+cont ({slots} sl)": combined,
            }
            for n in args.slots[1:]:
                fns[f"shared+cont ({n} sl)"] = combined_at(n, name=f"shared+cont ({n} sl)")
            if args.no_shrink:
                name = f"shared+cont ({slots}, no shrink)"
                fns[name] = combined_at(slots, min_slots=slots, name=name)
            if args.variants:
                fns = {k: v for k, v in fns.items() if k == "today" or k.split(" ")[0] in args.variants}
            if hf is not None:
                width = max(len(p) for p in prompts)
                ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
                mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])

                def hf_generate(ids=ids, mask=mask, K=K, new=new, eos=eos):
                    with torch.inference_mode():
                        out = hf.generate(
                            ids,
                            attention_mask=mask,
                            do_sample=True,
                            temperature=1.0,
                            top_k=0,
                            max_new_tokens=new,
                            num_return_sequences=K,
                            eos_token_id=list(eos),
                            pad_token_id=0,
                        )
                    gen = out[:, ids.shape[1] :].numpy()
                    stop = np.isin(gen, eos)
                    made["HF generate"] = int(sum((np.argmax(r) + 1) if r.any() else len(r) for r in stop))

                fns["HF generate"] = hf_generate
            times = interleaved_medians(fns, args.repeats)
            base = made["today"] / times["today"]
            for name, t in times.items():
                tps = made[name] / t
                print(f"{lname:10s} {K:2d} {name:22s} {tps:9.1f} {tps / base:8.2f} {made[name]:7d}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
