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


def _compile_once(out_dir: str) -> None:
    """The stages of a run compile the same programs again (the SFT arms' steps, the two DPO
    arms', every arm's sampler): JAX's persistent cache in the run directory compiles each
    once, and a rerun none. A cached executable is the one compiled, so no number moves. A
    cache the user chose (JAX_COMPILATION_CACHE_DIR) is kept."""
    import jax

    if jax.config.jax_compilation_cache_dir is None:
        jax.config.update("jax_compilation_cache_dir", os.path.join(os.path.abspath(out_dir), "xla_cache"))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def main(argv=None):
    ap = gin_arg_parser(__doc__)
    args = ap.parse_args(argv)
    # No gin file is needed: the defaults are the miniature; bindings only change knobs.
    args.gin_param = ["run_miniature.seed = 0"] + args.gin_param
    parse_gin(args, ["rlaif_jax.miniature"])
    import gin

    from rlaif_jax.miniature import run_miniature

    try:
        out = gin.query_parameter("run_miniature.out_dir")
    except ValueError:
        out = "runs/miniature"
    _compile_once(out)
    rows = run_miniature()
    print(open(os.path.join(out, "results.md")).read())
    print(f"table: {os.path.join(out, 'results.md')} (and results.csv)\nplot:  {os.path.join(out, 'results.png')}")
    return 0 if rows else 1


if __name__ == "__main__":
    sys.exit(run(main))
