"""Synthetic "models" for the miniature: teachers that are right with a set probability
and otherwise wrong in plausible ways, a pairwise critic with noise and position bias, and
a 1-5 rater. Each is a pure function of the request text and a seed derived from it, so
answers are reproducible (and cacheable) like a temperature-0 API."""

from __future__ import annotations

import dataclasses
import random
import re
from typing import Optional

import gin

from rlaif_jax.synthetic.tasks import Task, parse_instruction, score

_SECTIONS = re.compile(
    r"## Instruction\s*\n(.*?)\n\s*## Output \(a\)\s*\n(.*?)\n\s*## Output \(b\)\s*\n(.*?)\n\s*## ", re.DOTALL
)


def _error_candidate(task: Task, rng: random.Random) -> str:
    gold = task.answer.split()
    if task.kind in ("reverse", "sort"):
        choice = rng.random()
        if choice < 0.4 and len(gold) > 1:  # one adjacent swap
            i = rng.randrange(len(gold) - 1)
            gold[i], gold[i + 1] = gold[i + 1], gold[i]
            return " ".join(gold)
        if choice < 0.7:  # echoes the input unchanged
            return " ".join(map(str, task.args))
        return " ".join(gold[:-1]) if len(gold) > 1 else gold[0] + " " + gold[0]  # drops or repeats an item
    return str(max(0, int(task.answer) + rng.choice((-2, -1, 1, 2))))


def plausible_error(task: Task, rng: random.Random) -> str:
    """A wrong answer of the kind a weak model gives (never accidentally right: a swap of
    equal items or the echo of a palindrome is redrawn)."""
    for _ in range(10):
        out = _error_candidate(task, rng)
        if score(task, out) < 1.0:
            return out
    return task.answer + " " + task.answer.split()[-1]


@gin.configurable
@dataclasses.dataclass(frozen=True)
class Teacher:
    """Answers correctly with probability `strength`, else with a plausible error."""

    strength: float = 0.9

    def answer(self, instruction: str, rng: random.Random) -> str:
        task = parse_instruction(instruction)
        if task is None:
            return "I can only help with the listed tasks."
        return task.answer if rng.random() < self.strength else plausible_error(task, rng)


@gin.configurable
@dataclasses.dataclass(frozen=True)
class Critic:
    """A pairwise judge. With probability `position_bias` it answers "Output (a)" whatever
    the outputs; with probability `noise` it picks at random; otherwise it prefers the
    output it scores higher, where a critic of `strength` < 1 scores by the true score only
    that often and otherwise by a superficial proxy (the longer output). Equal scores are a
    coin flip. `invalid_rate` of answers are unparseable prose (tests the invalid path)."""

    strength: float = 1.0
    noise: float = 0.1
    position_bias: float = 0.0
    invalid_rate: float = 0.0

    def judge(self, instruction: str, output_a: str, output_b: str, rng: random.Random) -> str:
        if rng.random() < self.invalid_rate:
            return "Both outputs have merits and it is hard to say."
        if rng.random() < self.position_bias:
            return "Output (a)"
        if rng.random() < self.noise:
            return rng.choice(("Output (a)", "Output (b)"))
        task = parse_instruction(instruction)
        if task is not None and rng.random() < self.strength:
            sa, sb = score(task, output_a), score(task, output_b)
        else:
            sa, sb = len(output_a), len(output_b)
        if sa == sb:
            return rng.choice(("Output (a)", "Output (b)"))
        return "Output (a)" if sa > sb else "Output (b)"

    def rate(self, instruction: str, response: str, rng: random.Random) -> str:
        task = parse_instruction(instruction)
        s = score(task, response) if task is not None else 0.0
        if rng.random() < self.noise:
            s = rng.random()
        return f"Rating: {1 + round(4 * s)}"


def parse_pairwise_prompt(text: str) -> Optional[tuple[str, str, str]]:
    """(instruction, output_a, output_b) from a judge prompt in the template's layout."""
    m = _SECTIONS.search(text + "\n## ")
    if not m:
        return None
    return tuple(part.strip() for part in m.groups())


_RATING = re.compile(r"## Instruction\s*\n(.*?)\n\s*## Response\s*\n(.*?)\n\s*## ", re.DOTALL)


def parse_rating_prompt(text: str) -> Optional[tuple[str, str]]:
    m = _RATING.search(text + "\n## ")
    return tuple(part.strip() for part in m.groups()) if m else None
