#!/usr/bin/env python
"""Score preference pairs under the reference model once (DPO.reference = 'precomputed').

  python scripts/precompute_ref_logps.py --gin_param="precompute_reference_logps.preferences_dir='runs/toy/preferences'" \
      --gin_param="precompute_reference_logps.out_dir='runs/toy/preferences_ref'" \
      --gin_param="precompute_reference_logps.reference='runs/tiny_sft/hf'"
"""

import sys

from rlaif_jax.cli import main_with_gin, run


def main(argv=None):
    from rlaif_jax.train.reference import precompute_reference_logps

    manifest = main_with_gin(__doc__, lambda: precompute_reference_logps(), argv, ["rlaif_jax.train.reference"])
    print(f"wrote {sum(s['num_records'] for s in manifest['shards'])} pairs with reference log-probs")
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
