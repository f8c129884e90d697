"""Unpaired labelled completions (KTO's data): a rating-mode critic set -> labels by a
threshold (ties and invalid ratings dropped and counted), or preference pairs unpaired
(chosen desirable, rejected undesirable).

  rlaif labels --gin_file=configs/feedback/rating_labels.gin \\
      --gin_param="rating_labels_stage.comparisons='runs/critic_rating'" \\
      --gin_param="rating_labels_stage.out_dir='runs/labelled'"
  rlaif labels --from_pairs runs/toy/preferences runs/toy/labelled
"""

import argparse
import json
import sys

from rlaif_jax.cli import main_with_gin
from rlaif_jax.feedback.ratings import rating_labels_stage, unpair_preferences_stage


def main(argv=None):

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--from_pairs"]:
        ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
        ap.add_argument("--from_pairs", nargs=2, metavar=("PREFERENCES", "OUT_DIR"), required=True)
        prefs, out = ap.parse_args(argv).from_pairs
        manifest = unpair_preferences_stage(preferences=prefs, out_dir=out)
    else:
        manifest = main_with_gin(__doc__, rating_labels_stage, argv, extra_modules=("rlaif_jax.feedback.ratings",))
    counts = manifest["provenance"]["counts"]
    print(f"{manifest['num_records']} labelled completions; {json.dumps(counts)}")
    return 0
