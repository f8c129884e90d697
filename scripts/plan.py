#!/usr/bin/env python
"""`rlaif plan` from a clone (the command: rlaif_jax/plan.py)."""

import sys

from rlaif_jax.commands import run_command
from rlaif_jax.plan import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(run_command("plan", sys.argv[1:]))
