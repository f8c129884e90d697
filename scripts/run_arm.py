#!/usr/bin/env python
"""`rlaif arm` from a clone (the command: rlaif_jax/pipeline/command.py)."""

import sys

from rlaif_jax.commands import run_command
from rlaif_jax.pipeline.command import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(run_command("arm", sys.argv[1:]))
