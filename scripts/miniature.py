#!/usr/bin/env python
"""The paper in miniature on one CPU (no API key, no accelerator): a synthetic world of
checkable tasks served over the OpenAI-compatible API on 127.0.0.1, and the whole RLAIF
pipeline run through it. Prints where the table and the plot are.

  python scripts/miniature.py
  python scripts/miniature.py --gin_param="synthetic_world.weak_teacher=0.7" --gin_param="run_miniature.out_dir='runs/mini_w07'"
"""

import os
import sys

from rlaif_jax.cli import gin_arg_parser, parse_gin, run


def main(argv=None):
    ap = gin_arg_parser(__doc__)
    args = ap.parse_args(argv)
    # No gin file is needed: the defaults are the miniature; bindings only change knobs.
    args.gin_param = ["run_miniature.seed = 0"] + args.gin_param
    parse_gin(args, ["rlaif_jax.miniature"])
    import gin

    from rlaif_jax.miniature import run_miniature

    rows = run_miniature()
    try:
        out = gin.query_parameter("run_miniature.out_dir")
    except ValueError:
        out = "runs/miniature"
    print(open(os.path.join(out, "results.md")).read())
    print(f"table: {os.path.join(out, 'results.md')} (and results.csv)\nplot:  {os.path.join(out, 'results.png')}")
    return 0 if rows else 1


if __name__ == "__main__":
    sys.exit(run(main))
