#!/usr/bin/env python
"""`rlaif ref-logps` from a clone (the command: rlaif_jax/commands/ref_logps.py)."""

import sys

from rlaif_jax.commands import run_command
from rlaif_jax.commands.ref_logps import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(run_command("ref-logps", sys.argv[1:]))
