"""The paper in miniature on one CPU (no API key, no accelerator): a synthetic world of
checkable tasks served over the OpenAI-compatible API on 127.0.0.1, and the whole RLAIF
pipeline run through it. Prints where the table and the plot are.

  python scripts/miniature.py
  python scripts/miniature.py --gin_param="synthetic_world.weak_teacher=0.7" \\
    --gin_param="run_miniature.out_dir='runs/mini_w07'"
"""

from __future__ import annotations

import os
from typing import Optional, Sequence

import jax

from rlaif_jax.cli import gin_arg_parser, parse_gin
from rlaif_jax.miniature.campaign import MiniatureSettings
from rlaif_jax.miniature.run import run_miniature


def _compile_once(out_dir: str) -> None:
    """The stages of a run compile the same programs again (the SFT arms' steps, the two DPO
    arms', every arm's sampler): JAX's persistent cache in the run directory compiles each
    once, and a rerun none. A cached executable is the one compiled, so no number moves. A
    cache the user chose (JAX_COMPILATION_CACHE_DIR) is kept."""
    if jax.config.jax_compilation_cache_dir is None:
        jax.config.update("jax_compilation_cache_dir", os.path.join(os.path.abspath(out_dir), "xla_cache"))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The miniature's command line: gin bindings (no file needed: the defaults are the
    miniature), then the run; prints the table. 0 when it produced rows."""
    args = gin_arg_parser(__doc__).parse_args(argv)
    args.gin_param = ["run_miniature.seed = 0"] + args.gin_param
    parse_gin(args, ["rlaif_jax.miniature"])
    settings = MiniatureSettings()
    _compile_once(settings.out_dir)
    rows = run_miniature(settings)
    with open(os.path.join(settings.out_dir, "results.md")) as f:
        print(f.read())
    out = settings.out_dir
    print(f"table: {os.path.join(out, 'results.md')} (and results.csv)\nplot:  {os.path.join(out, 'results.png')}")
    return 0 if rows else 1
