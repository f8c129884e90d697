#!/usr/bin/env python
"""`rlaif samples` from a clone (the command: rlaif_jax/commands/samples.py)."""

import sys

from rlaif_jax.commands import run_command
from rlaif_jax.commands.samples import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(run_command("samples", sys.argv[1:]))
