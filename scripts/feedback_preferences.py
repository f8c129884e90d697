#!/usr/bin/env python
"""`rlaif preferences` from a clone (the command: rlaif_jax/commands/preferences.py)."""

import sys

from rlaif_jax.commands import run_command
from rlaif_jax.commands.preferences import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(run_command("preferences", sys.argv[1:]))
