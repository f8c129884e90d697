"""Score preference pairs under the reference model once (DPO.reference = 'precomputed').

  rlaif ref-logps --gin_param="precompute_reference_logps.preferences_dir='runs/toy/preferences'" \
      --gin_param="precompute_reference_logps.out_dir='runs/toy/preferences_ref'" \
      --gin_param="precompute_reference_logps.reference='runs/tiny_sft/hf'"
"""

from rlaif_jax.cli import main_with_gin
from rlaif_jax.train.reference import precompute_reference_logps


def main(argv=None):

    manifest = main_with_gin(__doc__, lambda: precompute_reference_logps(), argv, ["rlaif_jax.train.reference"])
    print(f"wrote {sum(s['num_records'] for s in manifest['shards'])} pairs with reference log-probs")
    return 0
