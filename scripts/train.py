#!/usr/bin/env python
"""Train any objective (SFT, DPO family, reward model) from gin files.

  python scripts/train.py --gin_file=configs/experiments/tiny_sft.gin
  python scripts/train.py --gin_file=configs/experiments/tiny_dpo.gin --gin_param="DPO.beta=0.1"

Relaunching the same command resumes from the run directory's last checkpoint. The full
and the operative gin configs are written to the run directory.
"""

import sys

from rlaif_jax.cli import main_with_gin


def main(argv=None):
    from rlaif_jax.train.loop import train

    main_with_gin(__doc__, lambda: train(), argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
