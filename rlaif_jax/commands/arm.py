"""`rlaif arm`: one arm of the paper, every stage chained and resumable (scripts/run_arm.py's
main, loaded from the clone until the pipeline branch's rlaif_jax.pipeline.command lands)."""

from rlaif_jax.commands._clone_script import script_main


def main(argv=None):
    return script_main("run_arm")(argv)
