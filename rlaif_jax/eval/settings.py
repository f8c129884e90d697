"""The evaluation's own judge and sampling settings.

Subclasses of the feedback stages' settings under their own gin names, so an arm config
that holds both the critic's `JudgeSettings.*` and the evaluation's `EvalJudgeSettings.*`
keeps them apart, and the evaluation keeps its own defaults (AlpacaEval 1.0 in the paper:
T=0.7, top_p 0.9, 1024 tokens including the prompt).
"""

from __future__ import annotations

import dataclasses

import gin

from rlaif_jax.feedback.settings import JudgeSettings, SamplingSettings


@gin.configurable
@dataclasses.dataclass(frozen=True)
class EvalJudgeSettings(JudgeSettings):
    """The evaluation judge (always pairwise: the policy's output against the reference);
    `seed` decides the presented order per instruction and seeds the LC bootstrap."""


@gin.configurable
@dataclasses.dataclass(frozen=True)
class EvalSamplingSettings(SamplingSettings):
    """How the policy's eval outputs are sampled."""

    max_length: int = 1024
    max_prompt_length: int = 512
    temperature: float = 0.7
