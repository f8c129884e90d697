#!/usr/bin/env python
"""`rlaif toy-data` from a clone (the command: rlaif_jax/commands/toy_data.py)."""

import sys

from rlaif_jax.commands import run_command
from rlaif_jax.commands.toy_data import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(run_command("toy-data", sys.argv[1:]))
