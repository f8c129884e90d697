#!/usr/bin/env python
"""Run (or resume) one arm of the paper: rlaif_jax.pipeline.command (`--help` for its usage)."""

import sys

from rlaif_jax.cli import run
from rlaif_jax.pipeline.command import main

if __name__ == "__main__":
    sys.exit(run(main))
