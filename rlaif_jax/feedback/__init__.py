"""AI feedback, offline: teacher completions and critic judgments through OpenAI-compatible
APIs, with a resumable cache, limits, retries, the Batch API and cost accounting.

    client        FeedbackClient (gin): concurrency, RPM/TPM limits, retries honouring
                  Retry-After, JSONL cache, Batch API, token and dollar accounting
    request       ChatRequest and its cache key (model, messages, sampling params, template)
    judge         versioned judge templates, verdict parsing, order randomization and
                  un-swapping, both-orders mode, logprob-weighted preferences, 1-5 ratings
    preferences   comparisons -> preference pairs, with a critic report
    settings      JudgeSettings, SamplingSettings: what the stages take as values (gin)
    stages        teacher / policy-samples / critic / preferences stages (gin) -> TFRecords
    audit         the teacher-critic gap audit: the critic's preference for the strongest
                  model over the SFT teacher, with an interval and the paper's reading
    server        an OpenAI-compatible server over pluggable backends (a local checkpoint,
                  the synthetic world, test fault injection)
"""

from rlaif_jax.feedback.client import FeedbackClient, FeedbackError, Summary
from rlaif_jax.feedback.judge import VERDICTS, JudgeTemplate, PairTask, load_template
from rlaif_jax.feedback.preferences import build_preference_pairs, critic_report
from rlaif_jax.feedback.request import ChatRequest
from rlaif_jax.feedback.settings import JudgeSettings, SamplingSettings

__all__ = [
    "ChatRequest",
    "FeedbackClient",
    "FeedbackError",
    "JudgeSettings",
    "JudgeTemplate",
    "PairTask",
    "SamplingSettings",
    "Summary",
    "VERDICTS",
    "build_preference_pairs",
    "critic_report",
    "load_template",
]
