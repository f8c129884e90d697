#!/usr/bin/env python
"""`rlaif aot` from a clone (the command: rlaif_jax/commands/aot.py)."""

import sys

from rlaif_jax.commands import run_command
from rlaif_jax.commands.aot import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(run_command("aot", sys.argv[1:]))
