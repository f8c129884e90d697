"""`rlaif miniature`: the paper in miniature on one CPU (scripts/miniature.py's main, loaded
from the clone until the pipeline branch's rlaif_jax.miniature.command lands)."""

from rlaif_jax.commands._clone_script import script_main


def main(argv=None):
    return script_main("miniature")(argv)
