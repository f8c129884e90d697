#!/usr/bin/env python
"""Write the toy reverse-the-words world (tokenizer, demonstration and preference records)
that configs/experiments/tiny_*.gin train on.

  python scripts/make_toy_data.py runs/toy
"""

import argparse


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out_dir")
    ap.add_argument("--examples", type=int, default=64)
    args = ap.parse_args()
    from rlaif_jax.data.toy import write_toy_world

    w = write_toy_world(args.out_dir, args.examples)
    for k in ("tokenizer", "demonstrations", "preferences"):
        print(f"{k}: {w[k]}")


if __name__ == "__main__":
    main()
