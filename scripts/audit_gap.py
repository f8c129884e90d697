#!/usr/bin/env python
"""`rlaif audit` from a clone (the command: rlaif_jax/commands/audit.py)."""

import sys

from rlaif_jax.commands import run_command
from rlaif_jax.commands.audit import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(run_command("audit", sys.argv[1:]))
