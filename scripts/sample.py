#!/usr/bin/env python
"""`rlaif sample` from a clone (the command: rlaif_jax/commands/sample.py)."""

import sys

from rlaif_jax.commands import run_command
from rlaif_jax.commands.sample import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(run_command("sample", sys.argv[1:]))
