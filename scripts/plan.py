#!/usr/bin/env python
"""Price a run before it runs: see rlaif_jax/plan.py (`python scripts/plan.py --help`)."""

import sys

from rlaif_jax.cli import run
from rlaif_jax.plan import main

if __name__ == "__main__":
    sys.exit(run(main))
