"""The synthetic world: tasks round-trip through their text, the scorer gives the right
partial credit, teachers and the critic behave as their knobs say, over real HTTP."""

import asyncio
import random

import openai
import pytest

from rlaif_jax.feedback.server import ServerThread, make_app
from rlaif_jax.synthetic.backend import SyntheticBackend, synthetic_world
from rlaif_jax.synthetic.models import Critic, Teacher, parse_pairwise_prompt, plausible_error
from rlaif_jax.synthetic.tasks import Task, make_instructions, parse_instruction, score


def test_tasks_round_trip_and_score_partial_credit():
    for text in make_instructions(200, seed=3):
        task = parse_instruction(text)
        assert task is not None and task.instruction == text
        assert score(task, task.answer) == 1.0
    rev = Task("reverse", ("red", "cat", "blue", "dog"))
    assert rev.answer == "dog blue cat red"
    assert score(rev, "dog blue red cat") == 0.5
    assert score(rev, "dog blue cat") == 0.75  # one missing item costs its position
    assert score(rev, "") == 0.0
    srt = Task("sort", (5, 2, 9))
    assert srt.answer == "2 5 9" and score(srt, "2 9 5") == pytest.approx(1 / 3)
    add = Task("add", (7, 6))
    assert [score(add, x) for x in ("13", "12", "15", "17", "thirteen")] == [1.0, 0.5, 0.25, 0.0, 0.0]
    assert parse_instruction("Tell me a joke") is None
    assert len(set(make_instructions(300, seed=0))) == 300


def test_plausible_errors_are_wrong_but_close():
    rng = random.Random(0)
    for text in make_instructions(200, seed=1):
        task = parse_instruction(text)
        err = plausible_error(task, rng)
        assert score(task, err) < 1.0 and err.strip()


def test_teacher_strength_is_its_accuracy():
    rng = random.Random(0)
    tasks = make_instructions(1000, seed=2)
    for strength in (0.2, 0.9):
        acc = sum(score(parse_instruction(t), Teacher(strength).answer(t, rng)) == 1.0 for t in tasks) / len(tasks)
        assert abs(acc - strength) < 0.05


def test_critic_noise_and_position_bias():
    rng = random.Random(0)
    task = Task("reverse", ("red", "cat", "blue"))
    good, bad = task.answer, "red cat blue"
    n = 4000

    def rate_a(critic, a, b):
        return sum(critic.judge(task.instruction, a, b, rng) == "Output (a)" for _ in range(n)) / n

    clean = Critic(noise=0.0)
    assert rate_a(clean, good, bad) == 1.0 and rate_a(clean, bad, good) == 0.0
    noisy = Critic(noise=0.2)
    assert abs(rate_a(noisy, bad, good) - 0.1) < 0.02  # half the random picks hit (a)
    biased = Critic(noise=0.0, position_bias=0.3)
    assert abs(rate_a(biased, bad, good) - 0.3) < 0.03
    weak = Critic(strength=0.0, noise=0.0)  # judges by length only
    assert rate_a(weak, "x y z w v u t s", good) == 1.0


def test_judge_prompt_parsing_matches_the_template():
    from rlaif_jax.feedback.judge import PairTask, load_template, pairwise_messages

    template = load_template("pairwise_v1")
    msgs = pairwise_messages(template, PairTask("id", "Add: 2 + 3", "5", "6"), swapped=True)
    assert parse_pairwise_prompt(msgs[-1]["content"]) == ("Add: 2 + 3", "6", "5")


def test_world_over_http_with_the_openai_client():
    world = synthetic_world(strong_teacher=1.0, weak_teacher=0.0, critic_noise=0.0, position_bias=0.0)
    with ServerThread(make_app(world)) as srv:
        client = openai.OpenAI(base_url=srv.url, api_key="unused", max_retries=0)
        assert sorted(m.id for m in client.models.list().data) == sorted(world.model_ids())
        text = "Sort the numbers: 3 1 2"
        strong = client.chat.completions.create(model="strong-teacher", messages=[{"role": "user", "content": text}])
        weak = client.chat.completions.create(model="weak-teacher", messages=[{"role": "user", "content": text}])
        assert strong.choices[0].message.content == "1 2 3"
        assert score(parse_instruction(text), weak.choices[0].message.content) < 1
        again = client.chat.completions.create(model="weak-teacher", messages=[{"role": "user", "content": text}])
        assert again.choices[0].message.content == weak.choices[0].message.content  # reproducible
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": text}])


def test_backend_rejects_non_judge_prompts_for_the_critic():
    from rlaif_jax.feedback.server import BackendError

    backend = SyntheticBackend({"critic": Critic()})
    with pytest.raises(BackendError, match="neither"):
        asyncio.run(backend.complete({"model": "critic", "messages": [{"role": "user", "content": "hi"}]}))
