"""CPU throughput of the data pipeline: record reading + tokenization, and batch production.

Builds synthetic ShareGPT-like demonstrations and preference pairs (lengths drawn so that
many hit the 512-token budget), a byte-level BPE tokenizer trained on them, writes them as
record sets, then times:
  - pipeline construction (read TFRecords + tokenize + truncate), examples/s;
  - steady-state batches for SFT padded, SFT packed and preference, examples/s and
    real (non-padding) tokens/s, without prefetch (raw producer speed) and with it.

    python tools/benchmark_data.py [--examples 4000] [--batch_size 8] [--seconds 5]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np

from rlaif_jax.data import prompt_id
from rlaif_jax.data.pipeline import preference_pipeline, sft_pipeline
from rlaif_jax.data.records import DEMONSTRATIONS, PREFERENCES, write_records
from rlaif_jax.data.tokenize import build_test_tokenizer

WORDS = (
    "the of and to a in is that for it as was with be by on not he this are or his from at which "
    "but have an they you were her she there been one all we their has would when if more no out so "
    "said what up its about into than them can only other new some could time these two may then do "
    "first any my now such like our over man me even most made after also did many before must through "
    "model python function data training learning network value error list return class import result"
).split()


def _text(rng, lo, hi):
    words = rng.choice(WORDS, size=int(rng.integers(lo, hi)))
    return " ".join(words) + rng.choice([".", "?", "!\n", ":\n\n- item"])


def make_data(root, n, rng):
    demos, prefs = [], []
    for i in range(n):
        p = f"[{i}] " + _text(rng, 10, 250)
        demos.append(
            {
                "prompt_id": prompt_id(p),
                "prompt": p,
                "completion": _text(rng, 20, 400),
                "source_model": "synthetic",
                "finish_reason": "stop",
            }
        )
        prefs.append(
            {
                "prompt_id": prompt_id(p),
                "prompt": p,
                "chosen": _text(rng, 20, 400),
                "rejected": _text(rng, 20, 400),
                "provenance": "synthetic",
            }
        )
    write_records(f"{root}/demos", DEMONSTRATIONS, demos, num_shards=4)
    write_records(f"{root}/prefs", PREFERENCES, prefs, num_shards=4)
    corpus = [d["prompt"] + " " + d["completion"] for d in demos[:500]]
    build_test_tokenizer(f"{root}/tok", corpus, kind="bpe", vocab_size=4000)


def count(batch):
    seg = [v for k, v in batch.items() if k.endswith("segment_ids")]
    examples = sum(int(s.max(axis=1).sum()) for s in seg[:1])  # pairs count once
    tokens = sum(int((s > 0).sum()) for s in seg)
    return examples, tokens, sum(s.size for s in seg)


def run(name, make, seconds):
    t0 = time.perf_counter()
    it = make()
    build = time.perf_counter() - t0
    n_records = it._stream.num_examples
    it.close()
    results = {}
    for prefetch in (0, 2):
        it = make(prefetch=prefetch)
        next(it)  # warm-up (starts the thread)
        ex = tok = slots = nb = 0
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            e, t, s = count(next(it))
            ex, tok, slots, nb = ex + e, tok + t, slots + s, nb + 1
        dt = time.perf_counter() - t0
        it.close()
        results[prefetch] = (ex / dt, tok / dt, nb / dt, tok / slots)
    print(f"{name:<22} build: {n_records / build:8.0f} examples/s ({n_records} in {build:.2f}s)")
    for prefetch, (eps, tps, bps, eff) in results.items():
        label = "prefetch=2" if prefetch else "prefetch=0"
        print(
            f"{'':<22} {label}: {eps:9.0f} examples/s {tps:11.0f} tokens/s {bps:7.0f} batches/s  "
            f"real-token fraction {eff:.3f}"
        )


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--examples", type=int, default=4000)
    ap.add_argument("--batch_size", type=int, default=8)
    ap.add_argument("--seq_len", type=int, default=512)
    ap.add_argument("--seconds", type=float, default=5.0)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as root:
        t0 = time.perf_counter()
        make_data(root, args.examples, rng)
        print(
            f"data + tokenizer built in {time.perf_counter() - t0:.1f}s; "
            f"batch_size={args.batch_size} seq_len={args.seq_len} (max_length 512, max_prompt 256)"
        )
        common = dict(batch_size=args.batch_size, seq_len=args.seq_len, process_index=0, process_count=1)
        tok = f"{root}/tok"
        run(
            "sft padded",
            lambda prefetch=0: sft_pipeline(f"{root}/demos", tok, prefetch=prefetch, **common),
            args.seconds,
        )
        run(
            "sft packed",
            lambda prefetch=0: sft_pipeline(f"{root}/demos", tok, packing=True, prefetch=prefetch, **common),
            args.seconds,
        )
        run(
            "preference (pairs)",
            lambda prefetch=0: preference_pipeline(f"{root}/prefs", tok, prefetch=prefetch, **common),
            args.seconds,
        )


if __name__ == "__main__":
    main()
