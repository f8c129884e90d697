"""Offline data preparation stages, each a gin-configured run function:

  prepare_prompts            a prompt source (ShareGPT / Alpaca / JSONL / TRL / local HF
                             dataset) -> prompts, demonstrations, preferences record sets,
                             split by order (10% SFT / 90% feedback by default)
  import_paper_completions   the paper's released GPT-4 / Claude completion JSON
  import_paper_annotations   the paper's released AI-preference annotation JSON

  rlaif prepare prepare_prompts \\
      --gin_param="prepare_prompts.source='sharegpt.json'" --gin_param="prepare_prompts.output_dir='data/sharegpt'"
"""

from rlaif_jax.cli import gin_arg_parser, parse_gin
from rlaif_jax.data.prompts import imports, prepare

STAGES = ("prepare_prompts", "import_paper_completions", "import_paper_annotations")


def main(argv=None):
    ap = gin_arg_parser(__doc__)
    ap.add_argument("stage", choices=STAGES)
    args = ap.parse_args(argv)
    parse_gin(args)

    fn = getattr(prepare, args.stage, None) or getattr(imports, args.stage)
    stats = fn()
    print(stats)
    return 0
