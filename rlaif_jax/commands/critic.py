"""Critic judgments of two response sets (e.g. policy samples vs teacher) -> comparison records.

  OPENAI_API_KEY=... rlaif critic --gin_file=configs/feedback/critic_gpt4.gin \\
      --gin_param="critic_stage.responses_1='runs/policy_samples'" --gin_param="critic_stage.responses_2='runs/teacher_gpt4'" \\
      --gin_param="critic_stage.out_dir='runs/critic_gpt4'"

How the critic is asked is JudgeSettings (template, mode, both_orders, seed, logprobs,
top_logprobs, temperature, max_tokens, on_disagreement, name, batch_api, poll_interval_s):
e.g. --gin_param=JudgeSettings.both_orders=True.
"""

from rlaif_jax.cli import main_with_gin
from rlaif_jax.feedback.stages import critic_stage


def main(argv=None):

    manifest = main_with_gin(
        __doc__, critic_stage, argv, extra_modules=("rlaif_jax.feedback.stages", "rlaif_jax.feedback.client")
    )
    print(f"{manifest['num_records']} records; report: {manifest['provenance'].get('report', {}).get('api', '')}")
    return 0
