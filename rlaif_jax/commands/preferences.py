"""Comparisons from one or more critics -> preference pairs (ties and invalid dropped) + report.json.

  rlaif preferences --gin_file=configs/feedback/preferences.gin \\
      --gin_param="preferences_stage.comparisons=['runs/critic_gpt4']" --gin_param="preferences_stage.out_dir='runs/prefs'"
"""

import json

from rlaif_jax.cli import main_with_gin
from rlaif_jax.feedback.stages import preferences_stage


def main(argv=None):

    manifest = main_with_gin(
        __doc__, preferences_stage, argv, extra_modules=("rlaif_jax.feedback.stages", "rlaif_jax.feedback.client")
    )
    rep = manifest["provenance"]["report"]
    print(f"{manifest['num_records']} preference pairs; dropped {rep['dropped']}; judges {json.dumps(rep['judges'])}")
    return 0
