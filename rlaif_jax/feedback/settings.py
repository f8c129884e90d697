"""The settings the feedback stages take as values: how a judge is asked (JudgeSettings) and
how a local policy is sampled (SamplingSettings).

Each is a frozen, gin-configurable dataclass that checks itself on construction, so a bad
value is a one-line ConfigError naming its binding (`critic/JudgeSettings.max_tokens`)
before anything is sent or sampled. A stage given None builds its settings from gin where
it runs, inside the caller's gin scope: run_arm calls the critic stage inside scope
`critic`, so `critic/JudgeSettings.both_orders = True` reaches that stage and no other.
The evaluation has its own subclasses (rlaif_jax.eval.settings), so its bindings and the
critic's cannot leak into each other when one config holds both.

What a setting sends (template, temperature, max_tokens, logprobs, the order seed) goes
into the API request and so into its cache key: the same settings ask the same requests.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import gin

from rlaif_jax.errors import ConfigError, binding, in_range, non_negative, one_of, positive, whole

JUDGE_MODES = ("pairwise", "rating")
ON_DISAGREEMENT = ("tie", "invalid")


def _flag(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ConfigError(f"{name} = {value!r}: must be True or False")


@gin.configurable
@dataclasses.dataclass(frozen=True)
class JudgeSettings:
    """How the critic (or the evaluation judge) is asked and its answers read.

    Attributes:
      template: judge template name in feedback/templates, or a path to one.
      mode: "pairwise" (one answer names the better response) or "rating" (1-5 each).
      both_orders: pairwise only: ask in both presented orders and merge the verdicts.
      seed: decides, per prompt, which response is presented first (a hash, not a stream).
      logprobs / top_logprobs: ask for token logprobs, giving p_1 (probability that
        response_1 wins) besides the verdict.
      temperature / max_tokens: the judge request's sampling.
      on_disagreement: both orders disagreeing is a "tie" or "invalid".
      name: the judge's name in the records (None: the client's model).
      batch_api / poll_interval_s: send through the Batch API, polling this often.
    """

    template: str = "pairwise_v1"
    mode: str = "pairwise"
    both_orders: bool = False
    seed: int = 0
    logprobs: bool = False
    top_logprobs: int = 5
    temperature: float = 0.0
    max_tokens: int = 16
    on_disagreement: str = "tie"
    name: Optional[str] = None
    batch_api: bool = False
    poll_interval_s: float = 30.0

    def __post_init__(self):
        at = lambda field: binding(f"{type(self).__name__}.{field}")
        one_of(at("mode"), self.mode, JUDGE_MODES)
        one_of(at("on_disagreement"), self.on_disagreement, ON_DISAGREEMENT)
        for field in ("both_orders", "logprobs", "batch_api"):
            _flag(at(field), getattr(self, field))
        in_range(at("top_logprobs"), self.top_logprobs, 0, 20)
        non_negative(at("temperature"), self.temperature)
        whole(at("max_tokens"), self.max_tokens, 1)
        positive(at("poll_interval_s"), self.poll_interval_s)

    def request_params(self) -> dict:
        """The sampling parameters of every judge request (part of its cache key)."""
        params = {"temperature": self.temperature, "max_tokens": self.max_tokens}
        if self.logprobs:
            params.update(logprobs=True, top_logprobs=self.top_logprobs)
        return params


@gin.configurable
@dataclasses.dataclass(frozen=True)
class SamplingSettings:
    """How a local checkpoint is sampled for feedback (the paper: T=1.0, top_p 0.9, 512
    tokens including the prompt).

    Attributes:
      template: chat template the prompt is rendered with.
      max_length / max_prompt_length: tokens in all / of the prompt (longer prompts are cut).
      temperature / top_p / top_k: the sampling distribution (top_k 0: no top-k cut).
      seed: batch i is sampled with seed * 1_000_003 + i, so a resumed run repeats it.
      batch_size: prompts per compiled sampling call (with the seed, it decides the samples).
      rng_per_prompt: False (the default, the draws every published miniature table was made
        with): each decode step draws a batch's rows with one key. True: prompt i of batch b
        draws with fold_in(key(seed * 1_000_003 + b), i), whatever else is decoded beside it,
        which lets the K policy samples of the samples stage share one prefill per prompt and
        decode through continuous batching (sampling.generate_samples with slots): the same
        samples as K separate passes in this mode, ~2x faster (docs/performance.md). Switching
        it re-draws every sample, so the default stays per-batch.
    """

    template: str = "paper"
    max_length: int = 512
    max_prompt_length: int = 256
    temperature: float = 1.0
    top_p: float = 0.9
    top_k: int = 0
    seed: int = 0
    batch_size: int = 32
    rng_per_prompt: bool = False

    def __post_init__(self):
        at = lambda field: binding(f"{type(self).__name__}.{field}")
        if not isinstance(self.rng_per_prompt, bool):
            raise ConfigError(f"{at('rng_per_prompt')} = {self.rng_per_prompt!r}: must be True or False")
        non_negative(at("temperature"), self.temperature)
        in_range(at("top_p"), self.top_p, 0.0, 1.0, lo_open=True)
        non_negative(at("top_k"), self.top_k, "0 for no top-k cut")
        for field in ("max_length", "max_prompt_length", "batch_size"):
            whole(at(field), getattr(self, field), 1)
        if self.max_prompt_length >= self.max_length:
            raise ConfigError(
                f"{at('max_prompt_length')} = {self.max_prompt_length} leaves no room to sample "
                f"within max_length = {self.max_length}; set it below max_length"
            )

    def provenance(self) -> dict:
        """The settings as the records' provenance and the eval fingerprint write them (the
        default per-batch draws leave rng_per_prompt out: the published provenance is unchanged)."""
        d = dataclasses.asdict(self)
        if not self.rng_per_prompt:
            d.pop("rng_per_prompt")
        return d
