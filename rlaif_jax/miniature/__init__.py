"""The paper in miniature on one CPU: every arm of the paper, run by the pipeline's own
runner and stages (rlaif_jax.pipeline), on a synthetic world served over the
OpenAI-compatible API on 127.0.0.1 and a tiny model.

  world     the synthetic world: checkable instructions split 10% SFT / 90% feedback and a
            held-out evaluation set, the weak and strong teachers' completions, the
            tokenizer, and a tiny Llama pretrained on a web corpus (as the paper's base models
            come pretrained); and the evaluation in it (pairwise judge against the reference
            model's answers, and the task score the world knows)
  campaign  the settings, and one ArmSettings per arm: SFT weak 10% / 100%, strong 100% /
            10%; DPO from SFT weak 10% (finding 1) and SFT strong 10% (finding 3); a
            Bradley-Terry reward model on sample-vs-teacher and sample-vs-sample pairs + PPO
            from SFT weak 10% (finding 1b); optionally iterative DPO
  report    the table, the paper's findings as paired differences on the same eval prompts,
            results.md / results.csv / results.png / summary.json
  run       run_miniature: world, arms, report
  command   `scripts/miniature.py` / `rlaif miniature`

A killed run resumes (every stage finds its done marker; API answers are cached, so nothing
is asked twice).
"""

from rlaif_jax.miniature.campaign import ARMS, LABELS, OPTIONAL_ARMS, MiniatureSettings
from rlaif_jax.miniature.run import run_miniature
from rlaif_jax.miniature.world import win_rate

__all__ = ["ARMS", "LABELS", "OPTIONAL_ARMS", "MiniatureSettings", "run_miniature", "win_rate"]
