"""The chained arm's `rounds` stage: iterative RLAIF (rlaif_jax.iterative) over the arm's
own stage code.

Round r's steps are registry stages `round<r>/samples`, `round<r>/critic`,
`round<r>/preferences`, `round<r>/dpo` (and `round<r>/evaluate` before the last round)
walked by the arm's runner, so status.json records each, a relaunch resumes mid-round (every
step finds its done marker), host-0 steps run on process 0 alone, and each step runs in the
gin scope of its one-round stage (`dpo/make_optimizer.learning_rate` holds in every round).
The critic asks through the arm's `critic` answer cache, so nothing is paid twice. Round r's
outputs live under out_dir/rounds/<r>/; its numbers go into the summary as `round<r>/...`,
with the critic's API cost per round (`round<r>/cost_usd`).
"""

from __future__ import annotations

import collections.abc
import dataclasses
import functools
from typing import Any

import jax

from rlaif_jax import fileio
from rlaif_jax.iterative import (
    IterativeSettings,
    api_cost,
    comparison_sets,
    preference_sources,
    write_best_vs_worst,
)
from rlaif_jax.registry import Stage, is_complete

# Round step -> its directory under rounds/<r> (samples and comparisons hold one set each).
_PATHS = {"samples": "samples", "critic": "comparisons", "preferences": "preferences", "dpo": "dpo", "evaluate": "eval"}


class _Prefixed(collections.abc.MutableMapping):
    """The arm's results seen by a round: every key written gets the round's prefix."""

    def __init__(self, target: dict, prefix: str):
        self.target, self.prefix = target, prefix

    def __getitem__(self, k):
        return self.target[self.prefix + k]

    def __setitem__(self, k, v):
        self.target[self.prefix + k] = v

    def __delitem__(self, k):
        del self.target[self.prefix + k]

    def __iter__(self):
        return (k[len(self.prefix) :] for k in self.target if k.startswith(self.prefix))

    def __len__(self):
        return sum(1 for _ in self)


class _Round:
    """Round r of an arm as the arm's stage functions see it: outputs under rounds/<r>, the
    previous round's policy as the policy they start from ("sft_policy"), a seed of its own
    per round and sample, its numbers prefixed; everything else is the arm's."""

    def __init__(self, arm: Any, it: IterativeSettings, r: int, sample: int = 0):
        self.arm, self.it, self.r, self.sample = arm, it, r, sample
        s = arm.settings
        # Round 1's first sample uses the arm's seed, as the one-round arm's samples do.
        self.settings = dataclasses.replace(s, seed=s.seed + 1000 * sample + 7919 * (r - 1))
        self.name = f"{arm.name}/round{r}"
        self.results = _Prefixed(arm.results, f"round{r}/")

    def __getattr__(self, name: str):
        return getattr(self.arm, name)

    def dir(self, *parts: str) -> str:
        return fileio.join(self.arm.out("rounds"), str(self.r), *parts)

    def out(self, key: str) -> str:
        if key == "samples":
            return self.dir("samples", str(self.sample))
        return self.dir(_PATHS[key])

    def with_sample(self, k: int) -> "_Round":
        return _Round(self.arm, self.it, self.r, k)

    def sft_policy(self) -> str:
        """The policy this round samples from and starts DPO at: round r-1's."""
        return policy_of(self.arm, self.r - 1)


def policy_of(arm: Any, r: int) -> str:
    """Round r's DPO policy (HF directory); round 0 is the arm's SFT policy."""
    return arm.sft_policy() if r == 0 else fileio.join(arm.out("rounds"), str(r), "dpo", "hf")


def step_samples(view: _Round) -> dict:
    from rlaif_jax.arm import stage_samples

    states = [stage_samples(view.with_sample(k)).get("state", "done") for k in range(view.it.samples)]
    return {"state": "done" if "done" in states else "reused", "output": view.dir("samples")}


def _comparison_sets(view: _Round) -> list[tuple[str, str, str]]:
    samples = [view.with_sample(k).out("samples") for k in range(view.it.samples)]
    teacher = view.teacher_dir(view.settings.pair_teacher, "feedback")
    return comparison_sets(view.it, samples, teacher, view.dir("comparisons"))


def _is(comparisons: str, kind: str) -> bool:
    return comparisons.rstrip("/").rsplit("/", 1)[-1].startswith(kind)


def step_critic(view: _Round) -> dict:
    """The critic judges what the pairing needs (as the one-round critic stage does: its
    client, cache, judge settings, truncation and request-error limit)."""
    from rlaif_jax.arm import ArmError, _count_errors, critic_statistics
    from rlaif_jax.feedback.settings import JudgeSettings
    from rlaif_jax.feedback.stages import critic_stage, load_comparisons

    s = view.settings
    made = []
    for first, second, out in _comparison_sets(view):
        if is_complete(out):
            continue
        if s.critic is None:
            raise ArmError("the rounds stage needs run_arm.critic (e.g. @critic/FeedbackClient)")
        view.require(second, "the round's responses to compare with", "add 'teacher' to run_arm.stages")
        trunc = {"truncate_tokenizer": view.local(view.sft_policy())} if s.truncate_pairs else {}
        critic_stage(
            responses_1=first,
            responses_2=second,
            out_dir=out,
            client=s.critic(cache_path=view.cache("critic")),
            judge=dataclasses.replace(JudgeSettings(), seed=s.seed),
            num_shards=s.num_shards,
            **trunc,
        )
        view.check_requests(
            f"round {view.r} critic", out, "manifest.json", *_count_errors(fileio.join(out, "comparisons.jsonl"))
        )
        made.append(out)
    sets = [out for _, _, out in _comparison_sets(view)]
    if view.it.judges_samples:
        bvw = view.dir("comparisons", "best_worst")
        if not is_complete(bvw):
            write_best_vs_worst([o for o in sets if _is(o, "samples-")], bvw, num_shards=s.num_shards)
            made.append(bvw)
        view.results["best_worst/pairs"] = fileio.read_json(fileio.join(bvw, "report.json"))["pairs"]
    teacher_sets = [o for o in sets if _is(o, "teacher-")]
    if teacher_sets:
        view.results.update(critic_statistics([c for o in teacher_sets for c in load_comparisons(o)]))
    view.results["critic/cost_usd"] = api_cost(sets)
    return {"state": "done" if made else "reused", "output": view.dir("comparisons")}


def step_preferences(view: _Round) -> dict:
    from rlaif_jax.feedback.stages import preferences_stage

    out = view.out("preferences")
    state = "reused"
    if not is_complete(out):
        preferences_stage(
            comparisons=preference_sources(view.it, view.dir("comparisons")),
            out_dir=out,
            num_shards=view.settings.num_shards,
        )
        state = "done"
    view.results["preferences/pairs"] = fileio.read_json(fileio.join(out, "manifest.json"))["num_records"]
    return {"state": state, "output": out}


def step_dpo(view: _Round) -> dict:
    """DPO from the previous round's policy; the reference is the SFT model or that policy."""
    from rlaif_jax.arm import ARM_REGISTRY
    from rlaif_jax.data.pipeline.builders import preference_pipeline
    from rlaif_jax.train import DPO, loop

    out = view.out("dpo")
    start, ref = view.sft_policy(), policy_of(view.arm, view.it.reference_round(view.r))
    outcome = {"output": out, "init_from": start, "reference": ref}
    if is_complete(out):
        outcome["state"] = "reused"
    else:
        loop.train(
            run_dir=out,
            objective=DPO(),
            init_from=view.local(start),
            reference_from=None if ref == start else view.local(ref),
            train_data=functools.partial(preference_pipeline, view.out("preferences")),
            seed=view.settings.seed,
        )
    if jax.process_index() != 0:  # the summary is process 0's
        return outcome
    summary = fileio.read_json(fileio.join(out, "summary.json"))
    view.results.update({f"dpo/{k}": summary[k] for k in ARM_REGISTRY["dpo"].summary_keys if k in summary})
    return outcome


def step_evaluate(view: _Round) -> dict:
    from rlaif_jax.arm import _evaluate

    state = _evaluate(view, "evaluate", policy_of(view.arm, view.r))
    cost = view.results.get("eval/cost_usd_total")
    if cost is not None:
        view.results["cost_usd"] = view.results.get("critic/cost_usd", 0.0) + cost
    return {"state": state, "output": view.out("evaluate")}


def round_stages(r: int, it: IterativeSettings) -> list[Stage]:
    """Round r's steps as registry stages, each in its one-round stage's gin scope; the
    last round is evaluated by the arm's own evaluate stage."""
    steps = [
        Stage(f"round{r}/samples", step_samples, scope="samples"),
        Stage(f"round{r}/critic", step_critic, host0=True, scope="critic"),
        Stage(f"round{r}/preferences", step_preferences, host0=True, scope="preferences"),
        Stage(f"round{r}/dpo", step_dpo, done="summary.json", scope="dpo"),
    ]
    if it.evaluate_rounds and r < it.rounds:
        steps.append(Stage(f"round{r}/evaluate", step_evaluate, host0=True, done="metrics.json", scope="evaluate"))
    return steps


def stage_rounds(arm: Any) -> dict:
    """Runs (or resumes) every round; returns the stage's outcome. A round's critic cost
    (and its evaluation judge's) is summed into `round<r>/cost_usd`."""
    it = arm.settings.iterative
    for r in range(1, it.rounds + 1):
        view = _Round(arm, it, r)
        for stage in round_stages(r, it):
            arm.runner.run_stage(stage, view)
        if "cost_usd" not in view.results:
            view.results["cost_usd"] = view.results.get("critic/cost_usd", 0.0)
    if jax.process_index() == 0:
        fileio.write_json(
            fileio.join(arm.out("rounds"), "summary.json"),
            {k: v for k, v in arm.results.items() if k.startswith("round")},
        )
    return {"output": arm.out("rounds"), "rounds": it.rounds, "policy": policy_of(arm, it.rounds)}
