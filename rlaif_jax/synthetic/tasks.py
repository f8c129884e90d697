"""Instruction tasks whose answers a program can check, small enough for a tiny model to
learn on a CPU in minutes: reverse a list of words, sort numbers, count words, add two
numbers. Each instruction's text alone determines its answer, so every synthetic model
(teacher, critic, reference) recovers the task by parsing the text it is sent through the
API, exactly as a real model would have to.
"""

from __future__ import annotations

import dataclasses
import random
import re
from typing import Optional

WORDS = ("red", "green", "blue", "cat", "dog", "bird", "fish", "tree", "sun", "moon", "star", "book")
TASKS = ("reverse", "sort", "count", "add")

_PATTERNS = {
    "reverse": re.compile(r"^Reverse the words: (.+)$"),
    "sort": re.compile(r"^Sort the numbers: (.+)$"),
    "count": re.compile(r"^Count the words: (.+)$"),
    "add": re.compile(r"^Add: (\d+) \+ (\d+)$"),
}


@dataclasses.dataclass(frozen=True)
class Task:
    kind: str
    args: tuple

    @property
    def instruction(self) -> str:
        if self.kind == "reverse":
            return "Reverse the words: " + " ".join(self.args)
        if self.kind == "sort":
            return "Sort the numbers: " + " ".join(map(str, self.args))
        if self.kind == "count":
            return "Count the words: " + " ".join(self.args)
        return f"Add: {self.args[0]} + {self.args[1]}"

    @property
    def answer(self) -> str:
        if self.kind == "reverse":
            return " ".join(reversed(self.args))
        if self.kind == "sort":
            return " ".join(map(str, sorted(self.args)))
        if self.kind == "count":
            return str(len(self.args))
        return str(self.args[0] + self.args[1])


def parse_instruction(text: str) -> Optional[Task]:
    """The task behind an instruction, or None for text that is not one of ours."""
    text = text.strip()
    for kind, pat in _PATTERNS.items():
        m = pat.match(text)
        if not m:
            continue
        if kind in ("reverse", "count"):
            return Task(kind, tuple(m.group(1).split()))
        if kind == "sort":
            try:
                return Task(kind, tuple(int(x) for x in m.group(1).split()))
            except ValueError:
                return None
        return Task(kind, (int(m.group(1)), int(m.group(2))))
    return None


def _positional(pred: list, gold: list) -> float:
    if not gold:
        return float(not pred)
    hits = sum(p == g for p, g in zip(pred, gold))
    return hits / max(len(pred), len(gold))


def score(task: Task, output: str) -> float:
    """Partial credit in [0, 1]: the fraction of positions right for lists (a wrong length
    costs), closeness for numbers."""
    out = output.strip().split()
    if task.kind in ("reverse", "sort"):
        return _positional(out, task.answer.split())
    try:
        value = int(out[0]) if len(out) == 1 else None
    except ValueError:
        value = None
    if value is None:
        return 0.0
    gap = abs(value - int(task.answer))
    return {0: 1.0, 1: 0.5, 2: 0.25}.get(gap, 0.0)


def sample_task(rng: random.Random, kinds=TASKS, min_items: int = 2, max_items: int = 5) -> Task:
    kind = rng.choice(list(kinds))
    n = rng.randint(min_items, max_items)
    if kind in ("reverse", "count"):
        return Task(kind, tuple(rng.choice(WORDS) for _ in range(n)))
    if kind == "sort":
        return Task(kind, tuple(rng.randint(0, 9) for _ in range(n)))
    return Task(kind, (rng.randint(0, 9), rng.randint(0, 9)))


def make_instructions(n: int, seed: int = 0, kinds=TASKS) -> list[str]:
    """n distinct instructions (distinct so prompt ids never collide after dedup)."""
    rng = random.Random(seed)
    seen, out = set(), []
    for _ in range(50 * n):
        text = sample_task(rng, kinds).instruction
        if text not in seen:
            seen.add(text)
            out.append(text)
            if len(out) == n:
                return out
    raise ValueError(f"could not draw {n} distinct instructions from tasks {kinds}")


def vocabulary() -> list[str]:
    """Every word the tasks and answers use (for building the tokenizer)."""
    words = list(WORDS) + [str(i) for i in range(20)]
    words += "Reverse the words : Sort numbers Count Add +".split()
    return words
