#!/usr/bin/env python
"""`rlaif evaluate` from a clone (the command: rlaif_jax/commands/evaluate.py)."""

import sys

from rlaif_jax.commands import run_command
from rlaif_jax.commands.evaluate import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(run_command("evaluate", sys.argv[1:]))
