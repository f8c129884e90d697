#!/usr/bin/env python
"""`rlaif report` from a clone (the command: rlaif_jax/commands/report.py)."""

import sys

from rlaif_jax.commands import run_command
from rlaif_jax.commands.report import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(run_command("report", sys.argv[1:]))
