#!/usr/bin/env python
"""`rlaif labels` from a clone (the command: rlaif_jax/commands/labels.py)."""

import sys

from rlaif_jax.commands import run_command
from rlaif_jax.commands.labels import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(run_command("labels", sys.argv[1:]))
