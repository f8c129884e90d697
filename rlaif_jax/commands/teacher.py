"""Teacher completions for a prompt set through an OpenAI-compatible API -> demonstration records.

  OPENAI_API_KEY=... rlaif teacher --gin_file=configs/feedback/teacher_gpt4.gin \\
      --gin_param="teacher_stage.prompts='runs/prompts'" --gin_param="teacher_stage.out_dir='runs/teacher_gpt4'"

Rerunning the same command after a crash or kill sends only the requests not yet cached.
"""

from rlaif_jax.cli import main_with_gin
from rlaif_jax.feedback.stages import teacher_stage


def main(argv=None):

    manifest = main_with_gin(
        __doc__, teacher_stage, argv, extra_modules=("rlaif_jax.feedback.stages", "rlaif_jax.feedback.client")
    )
    print(f"{manifest['num_records']} records; report: {manifest['provenance'].get('report', {}).get('api', '')}")
    return 0
