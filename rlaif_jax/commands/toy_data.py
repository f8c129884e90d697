"""Write the toy reverse-the-words world (tokenizer, demonstration and preference records)
that configs/experiments/tiny_*.gin train on, or (--kind arm) the synthetic world's inputs
for configs/experiments/tiny_arm.gin: a prompt file with the weak teacher's replies, an
AlpacaEval-format evaluation set and a tiny random base model, or (--kind released) those
plus files in the shapes and names of the paper's released data, built from the prompts
(configs/experiments/paper/released/tiny.gin).

  rlaif toy-data runs/toy
  rlaif toy-data runs/tiny_arm --kind arm
  rlaif toy-data runs/tiny_released --kind released --examples 80
"""

import argparse

from rlaif_jax.data.toy import write_toy_world
from rlaif_jax.synthetic.arm_inputs import write_arm_inputs
from rlaif_jax.synthetic.released_files import write_released_inputs


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out_dir")
    ap.add_argument("--kind", choices=["toy", "arm", "released"], default="toy")
    ap.add_argument("--examples", type=int, default=64, help="toy: examples; arm: prompts (plus 1/5 as many eval)")
    args = ap.parse_args(argv)
    if args.kind == "arm":
        for k, v in write_arm_inputs(args.out_dir, args.examples, max(args.examples // 5, 1)).items():
            print(f"{k}: {v}")
        return 0
    if args.kind == "released":
        for k, v in write_released_inputs(args.out_dir, args.examples, max(args.examples // 5, 1)).items():
            print(f"{k}: {v}")
        return 0

    w = write_toy_world(args.out_dir, args.examples)
    for k in ("tokenizer", "demonstrations", "preferences"):
        print(f"{k}: {w[k]}")
    return 0
