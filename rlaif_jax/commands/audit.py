"""Teacher-critic gap audit, before any training: does the critic prefer the strongest
available model's completions over the candidate SFT teacher's? Prints the cost of the
uncached critic requests before sending any, then the critic's preference rate for the
strong model with its confidence interval and the paper's reading; writes
out_dir/{metrics.json, report.md, comparisons.jsonl}.

  OPENAI_API_KEY=... rlaif audit --gin_file=configs/feedback/audit_gap.gin \\
      --gin_param="audit_gap.teacher='runs/data/demonstrations/sft'" \\
      --gin_param="audit_gap.strong='runs/data/teachers/gpt-4-0314/demonstrations/sft'" \\
      --gin_param="audit_gap.out_dir='runs/audit_gpt35_vs_gpt4'"

The sample is AuditSettings (sample_size, seed, confidence, max_cost_usd); how the critic is
asked is JudgeSettings (always both orders). In the synthetic world (scripts/serve_openai.py
--synthetic), bind FeedbackClient.base_url and FeedbackClient.model='critic'.
"""

from rlaif_jax.cli import main_with_gin
from rlaif_jax.feedback.audit import audit_gap


def main(argv=None):

    r = main_with_gin(__doc__, audit_gap, argv, extra_modules=("rlaif_jax.feedback.audit",))
    print(
        f"strong preferred {r['strong_preferred']:.1f} +- {r['standard_error']:.1f}% "
        f"({r['statistics']['confidence']:.0%} interval {r['ci_low']:.1f}-{r['ci_high']:.1f}, "
        f"n={r['n_scored']}): {r['reading']}"
    )
    print(r["reading_text"])
    return 0
