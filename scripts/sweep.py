#!/usr/bin/env python
"""`rlaif sweep` from a clone (the command: rlaif_jax/commands/sweep.py)."""

import sys

from rlaif_jax.commands import run_command
from rlaif_jax.commands.sweep import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(run_command("sweep", sys.argv[1:]))
