#!/usr/bin/env python
"""`rlaif serve` from a clone (the command: rlaif_jax/commands/serve.py)."""

import sys

from rlaif_jax.commands import run_command
from rlaif_jax.commands.serve import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(run_command("serve", sys.argv[1:]))
