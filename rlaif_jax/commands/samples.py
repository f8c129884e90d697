"""Sample an SFT checkpoint (HF directory) on the feedback prompts with the compiled sampler
-> demonstration records (the paper: T=1.0, top_p 0.9, 512 tokens including the prompt).

  rlaif samples --gin_file=configs/feedback/policy_samples.gin \
      --gin_param="policy_samples_stage.hf_dir='runs/sft/hf'" --gin_param="policy_samples_stage.prompts='runs/prompts'" \
      --gin_param="policy_samples_stage.out_dir='runs/policy_samples'"

How the policy is sampled is SamplingSettings (template, max_length, max_prompt_length,
temperature, top_p, top_k, seed, batch_size): e.g. --gin_param=SamplingSettings.temperature=0.7.
"""

from rlaif_jax.cli import main_with_gin
from rlaif_jax.feedback.stages import policy_samples_stage


def main(argv=None):

    manifest = main_with_gin(__doc__, policy_samples_stage, argv, extra_modules=("rlaif_jax.feedback.stages",))
    print(f"{manifest['num_records']} samples: {manifest['provenance']['finish_reasons']}")
    return 0
