#!/usr/bin/env python
"""The paper in miniature on one CPU: rlaif_jax.miniature.command (`--help` for its usage)."""

import sys

from rlaif_jax.cli import run
from rlaif_jax.miniature.command import main

if __name__ == "__main__":
    sys.exit(run(main))
