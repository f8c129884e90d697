#!/usr/bin/env python
"""`rlaif miniature` from a clone (the command: rlaif_jax/miniature/command.py)."""

import sys

from rlaif_jax.commands import run_command
from rlaif_jax.miniature.command import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(run_command("miniature", sys.argv[1:]))
