"""The synthetic world behind the local OpenAI-compatible server: model names map to
synthetic teachers and critics, so the real client, cache, stages and evaluation run
unchanged against it on 127.0.0.1."""

from __future__ import annotations

import hashlib
import json
import random
from typing import Mapping, Sequence

import gin

from rlaif_jax.feedback.server import BackendError, Choice, Completion
from rlaif_jax.synthetic.models import Critic, Teacher, parse_pairwise_prompt, parse_rating_prompt


def _words(text: str) -> int:
    return len(text.split())


class SyntheticBackend:
    """Implements rlaif_jax.feedback.server.Backend over a {model name: Teacher | Critic}."""

    def __init__(self, models: Mapping[str, object], seed: int = 0):
        if not models:
            raise ValueError("the synthetic world needs at least one model")
        self.models = dict(models)
        self.seed = seed

    def model_ids(self) -> Sequence[str]:
        return list(self.models)

    def _rng(self, request: dict, index: int) -> random.Random:
        key = json.dumps([self.seed, request["model"], request["messages"], request.get("seed"), index], sort_keys=True)
        return random.Random(int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big"))

    async def complete(self, request: dict) -> Completion:
        name = request["model"]
        model = self.models.get(name)
        if model is None:
            raise BackendError(404, f"model {name!r} does not exist; served: {sorted(self.models)}", "not_found_error")
        text = request["messages"][-1]["content"]
        choices = []
        for i in range(request.get("n", 1) or 1):
            rng = self._rng(request, i)
            if isinstance(model, Critic):
                pair = parse_pairwise_prompt(text)
                rating = None if pair else parse_rating_prompt(text)
                if pair:
                    content = model.judge(*pair, rng)
                elif rating:
                    content = model.rate(*rating, rng)
                else:
                    raise BackendError(
                        400, f"critic {name!r} got a prompt that is neither a pairwise nor a rating judgment"
                    )
            else:
                content = model.answer(text, rng)
            choices.append(Choice(content=content, finish_reason="stop"))
        prompt_tokens = sum(_words(m["content"]) for m in request["messages"])
        return Completion(
            choices=choices,
            prompt_tokens=prompt_tokens,
            completion_tokens=sum(_words(c.content) for c in choices),
            model=name,
        )


@gin.configurable
def synthetic_world(
    strong_teacher: float = 0.9,
    weak_teacher: float = 0.4,
    reference: float = 0.5,
    critic_strength: float = 1.0,
    critic_noise: float = 0.1,
    position_bias: float = 0.2,
    invalid_rate: float = 0.0,
    web_quality: float = 0.5,
    judge_strength: float = 1.0,
    judge_noise: float = 0.15,
    judge_position_bias: float = 0.1,
    seed: int = 0,
) -> SyntheticBackend:
    """The miniature's models and what each stands for in the paper:

    strong-teacher  right with probability `strong_teacher`: GPT-4 as a teacher
    weak-teacher    right with probability `weak_teacher`: GPT-3.5 (ShareGPT's replies)
    reference       right with probability `reference`: text-davinci-003, AlpacaEval's
                    reference outputs
    web             right with probability `web_quality`: the pretraining corpus, whose
                    transcripts give the base model its abilities before any SFT
    critic          the pairwise feedback critic (GPT-4 as a critic): scores by the true
                    answer with probability `critic_strength`, else by length; `critic_noise`
                    random verdicts, `position_bias` "Output (a)" whatever is shown
    judge           the evaluation judge (AlpacaEval's annotator): the same kind of model with
                    its own knobs and name, so evaluation draws its own random stream
    """
    for name, v in (
        ("strong_teacher", strong_teacher),
        ("weak_teacher", weak_teacher),
        ("reference", reference),
        ("web_quality", web_quality),
        ("critic_strength", critic_strength),
        ("critic_noise", critic_noise),
        ("position_bias", position_bias),
        ("invalid_rate", invalid_rate),
        ("judge_strength", judge_strength),
        ("judge_noise", judge_noise),
        ("judge_position_bias", judge_position_bias),
    ):
        if not 0.0 <= v <= 1.0:
            raise ValueError(f"synthetic_world.{name} is a probability; got {v} (bind a value in [0, 1])")
    return SyntheticBackend(
        {
            "strong-teacher": Teacher(strong_teacher),
            "weak-teacher": Teacher(weak_teacher),
            "reference": Teacher(reference),
            "web": Teacher(web_quality),
            "critic": Critic(critic_strength, critic_noise, position_bias, invalid_rate),
            "judge": Critic(judge_strength, judge_noise, judge_position_bias, invalid_rate),
        },
        seed=seed,
    )
