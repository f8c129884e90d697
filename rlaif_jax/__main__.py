"""`python -m rlaif_jax ...`: the `rlaif` command without its installed script."""

import sys

from rlaif_jax.commands import main

if __name__ == "__main__":
    sys.exit(main())
