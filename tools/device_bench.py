#!/usr/bin/env python
"""The accelerator check: SFT and DPO train steps, the forward, generation and one PPO
iteration of a ~1B Llama-shaped model, each beside HF transformers + PyTorch (SDPA
attention) on the same device, shapes and dtype; one table of tokens/s, MFU, peak memory
and the ratio ours/peer, and a JSON of it (--out) with versions, backend and device.

  python tools/device_bench.py --out bench.json                 # one GPU, ~1B, bf16
  python tools/device_bench.py --preset tiny --isolate none     # CPU, toy shapes

Each (row, framework) runs in its own process by default (--isolate row): a clean peak
memory per row (JAX's allocator peak cannot be reset), no two frameworks holding one GPU,
and a row that fails (out of memory, a kernel missing) is recorded without stopping the
rest. A JAX row that fails in its attention kernel with attention_impl 'auto' (cuDNN on a
GPU) is retried once with 'xla'.
Times are medians over --steps calls after --warmup (compiles and autotuning excluded),
each call synchronised (block_until_ready / torch.cuda.synchronize). MFU is analytic
FLOPs (DecoderConfig.flops_per_token; see rlaif_jax/benchmarks.py) over the chip's dense
bf16 peak (rlaif_jax.train.metrics.PEAK_TFLOPS, or --peak_tflops); '-' where unknown (CPUs).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

import numpy as np

ROWS = ("sft", "dpo", "forward", "generate", "ppo")
FRAMEWORKS = ("jax", "torch")
RESULT = "DEVICE_BENCH_RESULT "
PACKAGES = ("jax", "jaxlib", "flax", "optax", "torch", "transformers")
# Recorded where installed: which CUDA / cuDNN each framework runs on.
GPU_PACKAGES = ("jax-cuda12-plugin", "jax-cuda13-plugin", "nvidia-cudnn-cu12", "nvidia-cudnn-cu13")


@dataclasses.dataclass(frozen=True)
class Shapes:
    """batch x seq_len: SFT rows, forward rows, DPO rows (batch // 2 pairs); gen_batch
    prompts of prompt_len decode new_tokens; PPO: ppo_batch prompts, ppo_epochs passes of
    ppo_mini_batch."""

    batch: int = 8
    seq_len: int = 2048
    gen_batch: int = 64
    prompt_len: int = 128
    new_tokens: int = 128
    ppo_batch: int = 64
    ppo_mini_batch: int = 16
    ppo_epochs: int = 2


# Presets not named here run the full shapes.
SHAPES = {"tiny": Shapes(2, 64, 4, 8, 8, 4, 2, 1)}


def parse_args(argv=None):
    from rlaif_jax.models.presets import PRESETS

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="llama-1b")
    ap.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    ap.add_argument("--attention_impl", default="auto", help="ours (DecoderConfig.attention_impl)")
    ap.add_argument("--remat", choices=["none", "full", "dots"], default="none", help="ours, train steps")
    ap.add_argument("--steps", type=int, default=5, help="timed calls per row (PPO: iterations, at most 2)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed calls first (compile, autotune; train steps >= 2)")
    ap.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated subset of {','.join(ROWS)}")
    ap.add_argument("--frameworks", default=",".join(FRAMEWORKS))
    ap.add_argument("--isolate", choices=["row", "none"], default="row", help="a process per (row, framework)")
    ap.add_argument("--deadline_s", type=float, default=460.0, help="no row starts after this; children killed")
    ap.add_argument("--peak_tflops", type=float, default=None, help="device peak for MFU where not known")
    ap.add_argument("--out", help="write the results as JSON here")
    for f in dataclasses.fields(Shapes):
        ap.add_argument(f"--{f.name}", type=int, default=None, help=f"default {f.default} (tiny: smaller)")
    ap.add_argument("--_child", help=argparse.SUPPRESS)
    ap.add_argument("--_weights", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    a.argv = list(sys.argv[1:] if argv is None else argv)
    base = SHAPES.get(a.preset, Shapes())
    a.shapes = dataclasses.replace(
        base, **{f.name: getattr(a, f.name) for f in dataclasses.fields(Shapes) if getattr(a, f.name)}
    )
    a.rows = [r for r in a.rows.split(",") if r]
    a.frameworks = [f for f in a.frameworks.split(",") if f]
    bad = sorted(set(a.rows) - set(ROWS)) + sorted(set(a.frameworks) - set(FRAMEWORKS))
    if bad:
        ap.error(f"unknown rows/frameworks {bad}; rows: {ROWS}, frameworks: {FRAMEWORKS}")
    return a


# -- one measurement (in a child process unless --isolate none) -----------------------------


def make_weights(a, path: str) -> None:
    """Random weights of the preset as an HF directory both frameworks load (float32)."""
    import jax

    from rlaif_jax.models import build_model, init_params
    from rlaif_jax.models.hf_io import save_hf
    from rlaif_jax.models.presets import preset_config

    cfg = preset_config(a.preset)
    save_hf(path, cfg, init_params(build_model(cfg), jax.random.key(0)))


def measure(row: str, fw: str, a, weights: str) -> dict:
    """{tokens, seconds, flops, peak_bytes, mem_kind, env}: one row of one framework."""
    return (_measure_jax if fw == "jax" else _measure_torch)(row, a, weights)


def _work(row: str, cfg, s: Shapes) -> tuple[int, float, int]:
    """(tokens counted for tok/s, analytic FLOPs, timed calls cap) of one call of a row."""
    from rlaif_jax import benchmarks as bm

    if row in ("sft", "dpo"):
        rows = s.batch if row == "sft" else 2 * (s.batch // 2)
        return rows * s.seq_len, bm.train_flops(cfg, row, rows, s.seq_len), 10**9
    if row == "forward":
        return s.batch * s.seq_len, bm.forward_flops(cfg, s.batch, s.seq_len), 10**9
    if row == "generate":
        return s.gen_batch * s.new_tokens, bm.generate_flops(cfg, s.gen_batch, s.prompt_len, s.new_tokens), 10**9
    # A PPO iteration takes seconds: two timed after one warm-up.
    return s.ppo_batch * s.new_tokens, bm.ppo_flops(cfg, s.ppo_batch, s.prompt_len, s.new_tokens, s.ppo_epochs), 2


def _timed(row: str, cfg, a, run) -> dict:
    from rlaif_jax.models.presets import median_seconds

    tokens, flops, cap = _work(row, cfg, a.shapes)
    # A train step fed its own donated output compiles a second time: two warm-up calls.
    warmup = 1 if row == "ppo" else max(a.warmup, 2) if row in ("sft", "dpo") else a.warmup
    seconds = median_seconds(run, min(a.steps, cap), warmup)
    return dict(tokens=tokens, seconds=seconds, flops=flops)


def _prompts(rs, rows: int, length: int, vocab: int) -> np.ndarray:
    return rs.randint(3, vocab, (rows, length)).astype(np.int32)


def _measure_jax(row: str, a, weights: str) -> dict:
    import jax

    from rlaif_jax import benchmarks as bm
    from rlaif_jax import sharding as shd
    from rlaif_jax.models import apply, build_model
    from rlaif_jax.models.hf_io import load_hf
    from rlaif_jax.models.presets import preset_config
    from rlaif_jax.sampling import SamplingParams, generate

    s, dev = a.shapes, jax.devices()[0]
    mesh = shd.make_mesh(-1, 1, 1)
    layout = shd.Layout(mesh, shd.logical_rules())
    rs = np.random.RandomState(0)
    numerics = dict(dtype=a.dtype, attention_impl=a.attention_impl)
    if row in ("sft", "dpo"):
        cfg, params = load_hf(weights, layout=layout, param_dtype="float32", remat_policy=a.remat, **numerics)
        n = s.batch if row == "sft" else s.batch // 2
        batch = bm.train_batch(row, rs, n, s.seq_len, cfg.vocab_size)
        run = bm.jax_train_runner(row, build_model(cfg, layout=layout), params, mesh, batch)
    elif row in ("forward", "generate"):
        cfg, params = load_hf(weights, layout=layout, param_dtype=a.dtype, **numerics)
        model = build_model(cfg, layout=layout)
        if row == "forward":
            ids = shd.shard_batch({"t": _prompts(rs, s.batch, s.seq_len, cfg.vocab_size)}, mesh)["t"]
            fwd = jax.jit(lambda p, t: apply(model, p, t)["logits"])

            def run():
                fwd(params, ids).block_until_ready()

        else:
            prompts = _prompts(rs, s.gen_batch, s.prompt_len, cfg.vocab_size).tolist()
            sp = SamplingParams(max_new_tokens=s.new_tokens, temperature=0.0, eos_ids=())

            def run():
                generate(model, params, prompts, jax.random.key(0), sp)  # host arrays: synchronous

    else:
        from rlaif_jax.train.ppo import PromptStream, metrics_row

        cfg = preset_config(a.preset, eos_token_id=None, **numerics)
        trainer, state = bm.ppo_trainer(
            cfg, layout, s.ppo_batch, s.ppo_mini_batch, s.ppo_epochs, s.prompt_len, s.new_tokens, "separate"
        )
        prompts = _prompts(rs, 4 * s.ppo_batch, s.prompt_len, cfg.vocab_size).tolist()
        stream = PromptStream(prompts, s.ppo_batch, 1, s.prompt_len, 0)
        holder = {"state": state}

        def run():
            holder["state"], m = trainer.iteration(holder["state"], shd.shard_batch(next(stream), mesh))
            metrics_row(m)  # device_get: synchronous

    timing = _timed(row, cfg, a, run)
    peak, kind = bm.jax_peak_memory(dev)
    env = {
        "backend": jax.default_backend(),
        "device": dev.device_kind,
        "devices": jax.device_count(),
        "attention_impl": cfg.attention_impl,
    }
    return dict(**timing, peak_bytes=peak, mem_kind=kind, env=env)


def _measure_torch(row: str, a, weights: str) -> dict:
    import torch

    from rlaif_jax import benchmarks as bm
    from rlaif_jax.models.config import DecoderConfig

    s, dev = a.shapes, bm.torch_device()
    dtype = getattr(torch, a.dtype)
    cfg = DecoderConfig.from_pretrained(weights)
    rs = np.random.RandomState(0)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    if row in ("sft", "dpo"):
        n = s.batch if row == "sft" else s.batch // 2
        run = bm.torch_train_runner(row, weights, bm.train_batch(row, rs, n, s.seq_len, cfg.vocab_size), dtype, dev)
    elif row in ("forward", "generate"):
        model = bm.load_torch(weights, dtype, dev).eval()
        if row == "forward":
            ids = torch.tensor(_prompts(rs, s.batch, s.seq_len, cfg.vocab_size), dtype=torch.long, device=dev)

            def run():
                with torch.inference_mode():
                    model(ids)
                bm.torch_sync(dev)

        else:
            p_ids = torch.tensor(_prompts(rs, s.gen_batch, s.prompt_len, cfg.vocab_size), dtype=torch.long, device=dev)

            def run():
                with torch.inference_mode():
                    bm.torch_generate(model, p_ids, s.new_tokens)
                bm.torch_sync(dev)

    else:
        prompts = _prompts(rs, s.ppo_batch, s.prompt_len, cfg.vocab_size)
        run = bm.torch_ppo_runner(weights, prompts, s.new_tokens, s.ppo_mini_batch, s.ppo_epochs, dtype, dev)
    timing = _timed(row, cfg, a, run)
    peak, kind = bm.torch_peak_memory(dev)
    env = {
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu",
        "cuda": torch.version.cuda,
        "attention": "sdpa",
    }
    return dict(**timing, peak_bytes=peak, mem_kind=kind, env=env)


# -- the parent: children, retries, the table -----------------------------------------------


def _child(a, row: str, fw: str, weights: str, timeout: float, extra=()) -> dict:
    argv = [sys.executable, os.path.abspath(__file__), *a.argv, *extra, "--_child", f"{row}:{fw}"]
    argv += ["--_weights", weights]
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=max(timeout, 1))
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    for line in p.stdout.splitlines():
        if line.startswith(RESULT):
            return json.loads(line[len(RESULT) :])
    lines = (p.stderr or p.stdout).strip().splitlines()
    raised = [line for line in lines if "Error" in line or "Exception" in line]
    return {"error": ((raised or lines)[-1:] or [f"exit {p.returncode}"])[0][-300:]}


def run_one(a, row: str, fw: str, weights: str, deadline: float) -> dict:
    if a.isolate == "none":
        try:
            return measure(row, fw, a, weights)
        except Exception as e:  # noqa: BLE001 - a failed row is recorded, the others still run
            return {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"}
    r = _child(a, row, fw, weights, deadline - time.monotonic())
    kernel = any(w in r.get("error", "").lower() for w in ("cudnn", "attention", "custom call"))
    if kernel and fw == "jax" and a.attention_impl == "auto":
        first = r["error"]
        r = _child(a, row, fw, weights, deadline - time.monotonic(), ("--attention_impl", "xla"))
        r["note"] = f"attention 'auto' failed ({first[:120]}); retried with 'xla'"
    return r


def versions() -> dict:
    out = {"python": platform.python_version()}
    for p in PACKAGES + GPU_PACKAGES:
        try:
            out[p] = importlib.metadata.version(p)
        except importlib.metadata.PackageNotFoundError:
            if p in PACKAGES:
                out[p] = None
    return out


def summarise(a, results: dict) -> dict:
    """Per row: tokens/s, MFU and peak memory of each framework and the ratio ours/peer."""
    from rlaif_jax.train.metrics import peak_tflops_of

    kinds = [r["env"]["device"] for fr in results.values() for r in fr.values() if "env" in r]
    peak = a.peak_tflops or next((p for p in map(peak_tflops_of, kinds) if p), None)
    table = []
    for row, fr in results.items():
        line = {"row": row}
        for fw, r in fr.items():
            if "error" in r:
                line[fw] = {"error": r["error"]}
                continue
            line[fw] = {
                "tok_s": r["tokens"] / r["seconds"],
                "seconds": r["seconds"],
                "mfu": r["flops"] / r["seconds"] / (peak * 1e12) if peak else None,
                "peak_gib": r["peak_bytes"] / 2**30,
                "mem_kind": r["mem_kind"],
                **({"note": r["note"]} if "note" in r else {}),
            }
        j, t = line.get("jax", {}), line.get("torch", {})
        line["ratio"] = j["tok_s"] / t["tok_s"] if "tok_s" in j and "tok_s" in t else None
        table.append(line)
    env = {fw: r["env"] for fr in results.values() for fw, r in fr.items() if "env" in r}
    return {"table": table, "peak_tflops": peak, "env": env}


def _cell(fr: dict, key: str, fmt: str) -> str:
    v = fr.get(key)
    return "-" if v is None else fmt.format(v)


def print_table(a, summary: dict) -> None:
    s = a.shapes
    shape = {
        "sft": f"{s.batch}x{s.seq_len}",
        "dpo": f"{s.batch // 2}x2x{s.seq_len}",
        "forward": f"{s.batch}x{s.seq_len}",
        "generate": f"{s.gen_batch}x({s.prompt_len}+{s.new_tokens})",
        "ppo": f"{s.ppo_batch}x({s.prompt_len}+{s.new_tokens})",
    }
    peak = summary["peak_tflops"]
    print(f"preset {a.preset}  dtype {a.dtype}  env {json.dumps(summary['env'])}")
    print(f"MFU: analytic FLOPs / {peak} TFLOP/s dense bf16 peak" if peak else "MFU: '-' (device peak unknown)")
    print(
        f"{'row':9s} {'shape':16s} {'jax tok/s':>11s} {'torch tok/s':>11s} {'ratio':>6s} "
        f"{'jax MFU':>8s} {'torch MFU':>9s} {'jax GiB':>8s} {'torch GiB':>9s}  memory"
    )
    for line in summary["table"]:
        j, t = line.get("jax", {}), line.get("torch", {})
        kinds = sorted({x["mem_kind"] for x in (j, t) if "mem_kind" in x})
        print(
            f"{line['row']:9s} {shape[line['row']]:16s} {_cell(j, 'tok_s', '{:11.1f}'):>11s} "
            f"{_cell(t, 'tok_s', '{:11.1f}'):>11s} {_cell(line, 'ratio', '{:6.2f}'):>6s} "
            f"{_cell(j, 'mfu', '{:7.1%}'):>8s} {_cell(t, 'mfu', '{:8.1%}'):>9s} "
            f"{_cell(j, 'peak_gib', '{:8.2f}'):>8s} {_cell(t, 'peak_gib', '{:9.2f}'):>9s}  {'/'.join(kinds)}"
        )
        for fw, x in (("jax", j), ("torch", t)):
            for k in ("error", "note"):
                if k in x:
                    print(f"  {fw} {k}: {x[k]}")
    if a.isolate == "none":
        print("(--isolate none: host RSS and JAX's device peak are process peaks so far, not per row)")
    print("(tok/s: sft/dpo/forward count every input token, dpo chosen + rejected; generate and ppo count new tokens)")


def main(argv=None):
    # Two frameworks share the GPU in --isolate none; elsewhere the JAX peak is what it used.
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    a = parse_args(argv)
    if a._child:
        row, fw = a._child.split(":")
        if row == "weights":
            make_weights(a, a._weights)
            print(RESULT + "{}")
            return
        print(RESULT + json.dumps(measure(row, fw, a, a._weights)), flush=True)
        return
    start = time.monotonic()
    deadline = start + a.deadline_s
    with tempfile.TemporaryDirectory() as weights:
        if a.isolate == "none":
            make_weights(a, weights)
        else:
            made = _child(a, "weights", "jax", weights, a.deadline_s)
            if "error" in made:
                raise SystemExit(f"could not write the random weights: {made['error']}")
        results: dict = {}
        for row in a.rows:
            for fw in a.frameworks:
                if time.monotonic() > deadline:
                    results.setdefault(row, {})[fw] = {"error": f"not run: past --deadline_s {a.deadline_s:.0f}"}
                    continue
                results.setdefault(row, {})[fw] = run_one(a, row, fw, weights, deadline)
                print(f"[{time.monotonic() - start:6.1f} s] {row} {fw}: done", file=sys.stderr, flush=True)
    summary = summarise(a, results)
    print_table(a, summary)
    if a.out:
        doc = {
            "preset": a.preset,
            "dtype": a.dtype,
            "attention_impl": a.attention_impl,
            "shapes": dataclasses.asdict(a.shapes),
            "steps": a.steps,
            "warmup": a.warmup,
            "isolate": a.isolate,
            "versions": versions(),
            "platform": platform.platform(),
            "wall_s": time.monotonic() - start,
            **summary,
        }
        with open(a.out, "w") as f:
            json.dump(doc, f, indent=2)


if __name__ == "__main__":
    main()
