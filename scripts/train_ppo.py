#!/usr/bin/env python
"""`rlaif ppo` from a clone (the command: rlaif_jax/commands/ppo.py)."""

import sys

from rlaif_jax.commands import run_command
from rlaif_jax.commands.ppo import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(run_command("ppo", sys.argv[1:]))
