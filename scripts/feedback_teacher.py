#!/usr/bin/env python
"""`rlaif teacher` from a clone (the command: rlaif_jax/commands/teacher.py)."""

import sys

from rlaif_jax.commands import run_command
from rlaif_jax.commands.teacher import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(run_command("teacher", sys.argv[1:]))
