#!/usr/bin/env python
"""`rlaif critic` from a clone (the command: rlaif_jax/commands/critic.py)."""

import sys

from rlaif_jax.commands import run_command
from rlaif_jax.commands.critic import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(run_command("critic", sys.argv[1:]))
