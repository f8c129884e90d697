#!/usr/bin/env python
"""`rlaif prepare` from a clone (the command: rlaif_jax/commands/prepare.py)."""

import sys

from rlaif_jax.commands import run_command
from rlaif_jax.commands.prepare import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(run_command("prepare", sys.argv[1:]))
