#!/usr/bin/env python
"""`rlaif train` from a clone (the command: rlaif_jax/commands/train.py)."""

import sys

from rlaif_jax.commands import run_command
from rlaif_jax.commands.train import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(run_command("train", sys.argv[1:]))
