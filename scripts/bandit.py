#!/usr/bin/env python
"""`rlaif bandit` from a clone (the command: rlaif_jax/commands/bandit.py)."""

import sys

from rlaif_jax.commands import run_command
from rlaif_jax.commands.bandit import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(run_command("bandit", sys.argv[1:]))
