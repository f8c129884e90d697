"""The arm's stage functions: each takes the run (an Arm, or a Round of one for the feedback
steps) and its own Stage record, does the work through the library's run function inside the
runner's gin scope, and returns its status.json outcome. The runner skips a stage whose outputs
are complete and checks its declared inputs first; `report_*` read a finished output's numbers
into the summary (after a run, and when the output is reused).

Round steps (samples, critic, preferences, dpo, evaluate) are the same functions for the
one-round arm (round 1, today's paths and stage names) and each round of a 'rounds' arm.
The `dpo` step trains run_arm.preference_objective (DPO, ORPO, CPO); `ratings` and `kto` are
the one-round arm's KTO on the critic's ratings.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
from typing import Mapping, Sequence

import gin
import jax

from rlaif_jax import fileio
from rlaif_jax.data.pipeline.builders import labelled_pipeline, preference_pipeline, sft_pipeline
from rlaif_jax.data.prompts.imports import import_paper_completions
from rlaif_jax.data.prompts.prepare import prepare_prompts
from rlaif_jax.data.records import DEMONSTRATIONS, PROMPTS, read_manifest, read_records, write_records
from rlaif_jax.eval.evaluate import evaluate
from rlaif_jax.feedback.audit import SUMMARY_KEYS, audit_gap
from rlaif_jax.feedback.client import FeedbackClient
from rlaif_jax.feedback.ratings import rating_labels_stage
from rlaif_jax.feedback.server.model_backend import shared_seeds
from rlaif_jax.feedback.settings import JudgeSettings, SamplingSettings
from rlaif_jax.feedback.stages import (
    critic_stage,
    load_comparisons,
    policy_samples_stage,
    preferences_stage,
    teacher_stage,
)
from rlaif_jax.fileio import read_json
from rlaif_jax.iterative import api_cost, write_best_vs_worst
from rlaif_jax.pipeline.context import Arm, Round, audit_settings, safe_name
from rlaif_jax.pipeline.runner import Stage, is_complete
from rlaif_jax.pipeline.settings import ArmError
from rlaif_jax.train import CPO, DPO, KTO, ORPO, SFT, RewardModel, loop
from rlaif_jax.train.ppo import train_ppo
from rlaif_jax.winrate import verdict_win_rate

log = logging.getLogger(__name__)

# The numbers of an evaluation's metrics.json that go into the summary.
EVAL_KEYS = (
    "win_rate",
    "standard_error",
    "lc_win_rate",
    "lc_bootstrap_standard_error",
    "lc_prediction_standard_error",
    "avg_length",
    "cost_usd_total",
)


def count_errors(jsonl: str) -> tuple[int, int]:
    """(rows with an API error, rows) of a judgments / comparisons JSONL file."""
    rows = fileio.read_jsonl(jsonl)
    return sum(bool(r.get("error")) for r in rows), len(rows)


def critic_statistics(comparisons: Sequence[Mapping]) -> dict:
    """The paper's critic statistic: how often the critic preferred the policy's sample
    (response 1) over the teacher's completion (GPT-4 preferred Llama-7B SFT over ChatGPT
    14.3% of the time, Claude-v1 30.2%); ties count half, invalid answers apart."""
    wr = verdict_win_rate([c["verdict"] for c in comparisons], policy_is="first")
    return {
        "critic/policy_preferred": wr.win_rate,
        "critic/policy_preferred_se": wr.standard_error,
        "critic/judged": wr.n_scored,
        "critic/ties": wr.n_ties,
        "critic/invalid": wr.n_invalid,
    }


# -- data --------------------------------------------------------------------------------


def stage_prompts(arm: Arm, stage: Stage) -> dict:
    s = arm.settings
    state = "reused"
    if not fileio.exists(fileio.join(s.data_dir, stage.done)):  # prepare_prompts writes it last
        if not s.prompt_source:
            raise ArmError("the prompts stage needs run_arm.prompt_source (a ShareGPT / Alpaca / JSONL file)")
        prepare_prompts(s.prompt_source, s.data_dir, num_shards=s.num_shards)
        state = "done"
    return {"state": state, "output": s.data_dir}


def report_prompts(arm: Arm, stage: Stage) -> None:
    stats = read_json(fileio.join(arm.settings.data_dir, stage.done))
    arm.results.update({f"prompts/{k}": v for k, v in stats.items() if k in ("sft", "feedback")})


def stage_teacher(arm: Arm, stage: Stage) -> dict:
    s = arm.settings
    done = []
    for model, split in arm.needed_teachers():
        out = arm.teacher_dir(model, split)
        if is_complete(out):
            continue
        if model == s.source_teacher:
            raise ArmError(
                f"{model} completions ({split}) should come with the prompts at {out}: the prompt "
                f"source has no replies; set run_arm.source_teacher to the model that wrote them, "
                f"or to '' and list {model} in run_arm.teachers"
            )
        if model in s.teacher_imports:
            import_paper_completions(
                s.teacher_imports[model],
                os.path.dirname(os.path.dirname(out)),
                source_model=model,
                prompts_dir=s.data_dir,
                num_shards=s.num_shards,
            )
        elif model in s.teachers:
            with gin.config_scope(None), gin.config_scope(s.teachers[model]):
                client = FeedbackClient(model=model, cache_path=arm.cache(f"teacher-{model}"))
                teacher_stage(
                    prompts=arm.prompts(split), out_dir=out, client=client, split=split, num_shards=s.num_shards
                )
            report = read_json(fileio.join(out, "report.json"))
            arm.check_requests(
                f"teacher {model} ({split})", out, stage.done, report["request_errors"], report["requested"]
            )
            if report["request_errors"]:
                log.warning(
                    "teacher %s (%s): %d request errors, listed in %s/errors.jsonl",
                    model,
                    split,
                    report["request_errors"],
                    out,
                )
            arm.results[f"teacher/{safe_name(model)}/{split}/request_errors"] = report["request_errors"]
        else:
            raise ArmError(
                f"the arm needs {model} completions for the {split} prompts and has no way to get "
                f"them: add {model!r} to run_arm.teachers (a client) or run_arm.teacher_imports "
                f"(a released completions file)"
            )
        done.append(f"{model}/{split}")
    return {"state": "done" if done else "reused", "made": done}


# -- the optional teacher-critic gap audit (issue 18) -------------------------------------


def stage_audit(arm: Arm, stage: Stage) -> dict:
    """The critic compares sft_teacher's completions with audit_against's on a seeded sample
    of one split's prompts, both orders, before anything is trained: a large gap means an
    RLAIF gain over this SFT teacher would mostly be the paper's weak-teacher artefact."""
    s = arm.settings
    out = arm.out("audit")
    if not s.audit_against:
        raise ArmError(
            "the audit stage needs run_arm.audit_against (the strongest model available, whose "
            "completions the SFT teacher's are compared with)"
        )
    if s.critic is None:
        raise ArmError("the audit stage needs run_arm.critic (e.g. @critic/FeedbackClient)")
    settings = audit_settings()
    hint = "add 'teacher' to run_arm.stages"
    teacher = arm.require(
        arm.teacher_dir(s.sft_teacher, settings.split), f"{s.sft_teacher} completions ({settings.split})", hint
    )
    strong = arm.require(
        arm.teacher_dir(s.audit_against, settings.split), f"{s.audit_against} completions ({settings.split})", hint
    )
    report = audit_gap(
        teacher=teacher,
        strong=strong,
        out_dir=out,
        client=s.critic(cache_path=arm.cache("audit")),
        judge=dataclasses.replace(JudgeSettings(), seed=s.seed),
        settings=settings,
    )
    arm.check_requests("audit", out, stage.done, report["api_errors"], report["join"]["sampled"])
    return {"output": out}


def report_audit(arm: Arm, stage: Stage) -> dict:
    report = read_json(fileio.join(arm.out("audit"), stage.done))
    arm.results.update({f"audit/{k}": report[k] for k in SUMMARY_KEYS if k in report})
    return {"reading": report["reading"]}


# -- training ----------------------------------------------------------------------------


def stage_sft(arm: Arm, stage: Stage) -> dict:
    s = arm.settings
    if s.sft_fraction == 0.0:
        return {"state": "skipped", "reason": "sft_fraction 0: the policy is the base model"}
    # Without run_arm.base_model, SFT starts from random weights of a bound train.model_config
    # (the miniature without pretraining); with neither, train says so in one line.
    out = arm.out("sft")
    data = arm.sft_data()
    loop.train(
        run_dir=out,
        objective=SFT(),
        init_from=s.base_model,
        train_data=functools.partial(sft_pipeline, data),
        seed=s.seed,
    )
    return {"output": out, "data": data}


def report_training(arm: Arm, stage: Stage) -> None:
    arm.train_results(stage.name, arm.out(stage.name))


def stage_reward_model(arm: Arm, stage: Stage) -> dict:
    view = arm.round(1)
    out = arm.out("reward_model")
    loop.train(
        run_dir=out,
        objective=RewardModel(),
        init_from=arm.local(arm.sft_policy()),
        train_data=functools.partial(preference_pipeline, view.reward_data()),
        seed=arm.settings.seed,
    )
    return {"output": out, "data": view.reward_data()}


def stage_ppo(arm: Arm, stage: Stage) -> dict:
    out = arm.out("ppo")
    train_ppo(
        run_dir=out,
        policy=arm.local(arm.sft_policy()),
        reward_model=arm.local(fileio.join(arm.out("reward_model"), "hf")),
        prompts=arm.prompts("feedback"),
        seed=arm.settings.seed,
    )
    return {"output": out}


# -- a round's feedback: samples -> critic -> preferences -> DPO --------------------------
# Each takes an Arm (its round 1) or a Round.


def _round(ctx) -> Round:
    return ctx if isinstance(ctx, Round) else ctx.round(1)


def step_samples(ctx, stage: Stage) -> dict:
    """The round's policy samples, each with its own seed. On n hosts, host i samples every
    n-th prompt on its own chips into <samples>/parts/, then process 0 joins the parts in the
    prompts' order into the record set the critic reads."""

    view = _round(ctx)
    arm, s = view.arm, view.settings
    made = []
    todo = [k for k in range(view.design.samples) if not is_complete(view.sample_dir(k))]
    base = SamplingSettings()
    # SamplingSettings.rng_per_prompt: the first pass draws every pass's samples of a batch
    # with one prefill per prompt (the same samples as K passes in that mode).
    seeds = [view.sample_seed(k) for k in todo]
    with shared_seeds(seeds) if base.rng_per_prompt and len(todo) > 1 else contextlib.nullcontext():
        for k in todo:
            out = view.sample_dir(k)
            sample = functools.partial(
                policy_samples_stage,
                hf_dir=arm.local(view.start()),
                prompts=arm.prompts("feedback"),
                split="feedback",
                sampling=dataclasses.replace(base, seed=view.sample_seed(k)),
                source_model=f"{view.name}/sft",
            )
            i, n = jax.process_index(), jax.process_count()
            if n == 1:
                sample(out_dir=out, num_shards=s.num_shards)
            else:
                _sample_on_hosts(arm, sample, out, i, n)
            made.append(k)
    hosts = {"hosts": jax.process_count()} if jax.process_count() > 1 else {}
    return {"state": "done" if made else "reused", "output": view.out("samples"), **hosts}


def _sample_on_hosts(arm: Arm, sample, out: str, i: int, n: int) -> None:
    part = fileio.join(out, "parts", f"host-{i:03d}-of-{n:03d}")
    if not is_complete(part):
        sample(out_dir=part, part=(i, n))
    arm.wait("samples_parts")
    if i == 0:
        parts = [fileio.join(out, "parts", f"host-{j:03d}-of-{n:03d}") for j in range(n)]
        by_id = {r["prompt_id"]: r for p in parts for r in read_records(p, DEMONSTRATIONS)}
        order = [r["prompt_id"] for r in read_records(arm.prompts("feedback"), PROMPTS)]
        provenance = {**read_manifest(parts[0])["provenance"], "part": None, "parts": parts}
        write_records(
            out,
            DEMONSTRATIONS,
            [by_id[p] for p in order if p in by_id],
            num_shards=arm.settings.num_shards,
            provenance=provenance,
        )


def step_critic(ctx, stage: Stage) -> dict:
    """The critic judges each sample against the pair teacher's completion and the pairs of
    samples the round's design needs (its client, cache, truncation and request-error limit),
    each judgment with its own seed."""
    view = _round(ctx)
    arm, s = view.arm, view.settings
    made = []
    for first, second, out, i, j in view.judgments():
        if is_complete(out):
            continue
        if s.critic is None:
            raise ArmError(f"the {stage.name} stage needs run_arm.critic (e.g. @critic/FeedbackClient)")
        trunc = {"truncate_tokenizer": arm.local(view.start())} if s.truncate_pairs else {}
        critic_stage(
            responses_1=first,
            responses_2=second,
            out_dir=out,
            client=s.critic(cache_path=arm.cache("critic")),
            judge=dataclasses.replace(JudgeSettings(), seed=view.critic_seed(i, j)),
            num_shards=s.num_shards,
            **trunc,
        )
        arm.check_requests(stage.name, out, "manifest.json", *count_errors(fileio.join(out, "comparisons.jsonl")))
        made.append(out)
    if view.design.best_worst and not is_complete(view.best_worst()):
        pairs = [view.sample_comparisons(i, j) for i, j in view.design.sample_pairs]
        write_best_vs_worst(pairs, view.best_worst(), num_shards=s.num_shards)
        made.append(view.best_worst())
    return {"state": "done" if made else "reused", "output": view.out("critic")}


def report_critic(ctx, stage: Stage) -> None:
    view = _round(ctx)
    teacher = [view.teacher_comparisons(k) for k in view.design.teacher_samples]
    if teacher:
        view.results.update(critic_statistics([c for o in teacher for c in load_comparisons(o)]))
    if view.design.best_worst:
        view.results["best_worst/pairs"] = read_json(fileio.join(view.best_worst(), "report.json"))["pairs"]
    if view.it is not None:
        view.results["critic/cost_usd"] = api_cost([o for _, _, o, _, _ in view.judgments()])


def step_preferences(ctx, stage: Stage) -> dict:
    """Preference pairs from the critic's verdicts: DPO's (sample vs teacher, best vs worst)
    and, with rm_pairs, the reward model's (those and every two samples' verdict)."""
    view = _round(ctx)
    sets = [(view.out("preferences"), view.preference_sources())]
    if view.design.rm_pairs:
        sets.append((view.out("rm_preferences"), view.reward_sources()))
    made = []
    for out, comparisons in sets:
        if not is_complete(out):
            preferences_stage(comparisons=comparisons, out_dir=out, num_shards=view.settings.num_shards)
            made.append(out)
    return {"state": "done" if made else "reused", "output": view.out("preferences")}


def report_preferences(ctx, stage: Stage) -> None:
    view = _round(ctx)
    view.results["preferences/pairs"] = read_json(fileio.join(view.out("preferences"), "manifest.json"))["num_records"]
    if view.design.rm_pairs:
        view.results["reward_model/pairs"] = read_json(fileio.join(view.out("rm_preferences"), "manifest.json"))[
            "num_records"
        ]


# run_arm.preference_objective -> the objective the dpo step builds (in its gin scope, so
# `dpo/DPO.beta`, `dpo/ORPO.beta`, `dpo/CPO.loss_type` hold).
PREFERENCE_OBJECTIVES = {"dpo": DPO, "orpo": ORPO, "cpo": CPO}


def step_dpo(ctx, stage: Stage) -> dict:
    """run_arm.preference_objective (DPO by default) from the round's starting policy on its
    preference pairs; DPO's reference is the SFT model or that policy, ORPO and CPO keep
    none."""
    view = _round(ctx)
    objective = PREFERENCE_OBJECTIVES[view.settings.preference_objective]()
    start, ref = view.start(), view.reference()
    if not objective.needs_reference:
        ref = None
    loop.train(
        run_dir=view.out("dpo"),
        objective=objective,
        init_from=view.arm.local(start),
        reference_from=None if ref in (None, start) else view.arm.local(ref),
        train_data=functools.partial(preference_pipeline, view.out("preferences")),
        seed=view.settings.seed,
    )
    named = {} if view.settings.preference_objective == "dpo" else {"objective": view.settings.preference_objective}
    return {"output": view.out("dpo"), "init_from": start, "reference": ref, **named}


def report_dpo(ctx, stage: Stage) -> None:
    view = _round(ctx)
    view.arm.train_results("dpo", view.out("dpo"), view.results)


# -- KTO on the critic's ratings: ratings -> kto -------------------------------------------


def step_ratings(ctx, stage: Stage) -> dict:
    """The critic rates each policy sample and the pair teacher's completion on its own
    (rating mode: JudgeSettings in the stage's scope, `ratings/JudgeSettings.mode =
    'rating'`), the same responses the critic stage judges pairwise, with the same seeds;
    then every rated response is labelled by `ratings/rating_labels_stage.threshold`
    (rlaif_jax.feedback.ratings: above desirable, below undesirable, ties and invalid
    ratings dropped and counted)."""
    view = _round(ctx)
    arm, s = view.arm, view.settings
    if s.critic is None:
        raise ArmError(f"the {stage.name} stage needs run_arm.critic (e.g. @critic/FeedbackClient)")
    judge = JudgeSettings()
    if judge.mode != "rating":
        raise ArmError(
            f"the {stage.name} stage asks the critic to rate each answer: bind {stage.name}/JudgeSettings.mode = "
            f"'rating' and {stage.name}/JudgeSettings.template = 'rating_v1' (as configs/feedback/critic_rating.gin), "
            f"got mode {judge.mode!r}"
        )
    teacher = arm.teacher_dir(s.pair_teacher, "feedback")
    made = []
    for k in view.design.teacher_samples:
        out = view.rating_comparisons(k)
        if is_complete(out):
            continue
        trunc = {"truncate_tokenizer": arm.local(view.start())} if s.truncate_pairs else {}
        critic_stage(
            responses_1=view.sample_dir(k),
            responses_2=teacher,
            out_dir=out,
            client=s.critic(cache_path=arm.cache("critic")),
            judge=dataclasses.replace(judge, seed=view.critic_seed(k)),
            num_shards=s.num_shards,
            **trunc,
        )
        arm.check_requests(stage.name, out, "manifest.json", *count_errors(fileio.join(out, "comparisons.jsonl")))
        made.append(out)
    labelled = view.out("labelled")
    if not is_complete(labelled):
        rating_labels_stage(
            comparisons=[view.rating_comparisons(k) for k in view.design.teacher_samples],
            out_dir=labelled,
            num_shards=s.num_shards,
        )
        made.append(labelled)
    return {"state": "done" if made else "reused", "output": labelled}


def report_ratings(ctx, stage: Stage) -> None:
    view = _round(ctx)
    counts = read_json(fileio.join(view.out("labelled"), "report.json"))
    view.results.update(
        {f"ratings/{k}": counts[k] for k in ("desirable", "undesirable", "ties", "invalid") if k in counts}
    )


def stage_kto(arm: Arm, stage: Stage) -> dict:
    """KTO from the SFT policy, which is also its reference (with LoRA: the base with the
    adapters off), on the labelled completions."""
    out = arm.out("kto")
    loop.train(
        run_dir=out,
        objective=KTO(),
        init_from=arm.local(arm.sft_policy()),
        train_data=functools.partial(labelled_pipeline, arm.out("labelled")),
        seed=arm.settings.seed,
    )
    return {"output": out, "data": arm.out("labelled")}


# -- evaluation --------------------------------------------------------------------------


def stage_evaluate(arm: Arm, stage: Stage) -> dict:
    for key, policy in arm.evaluations():
        if not is_complete(arm.out(key)):
            evaluate_policy(arm, arm.name, key, arm.out(key), policy, stage.done)
    return {"output": arm.out("evaluate")}


def report_evaluate(arm: Arm, stage: Stage) -> None:
    for key, _ in arm.evaluations():
        eval_results(arm, arm.out(key), "eval" if key == "evaluate" else "eval_sft", arm.results)


def step_evaluate(view: Round, stage: Stage) -> dict:
    """A round's policy, evaluated as the arm's (before the last round, which the arm's own
    evaluate stage evaluates)."""
    evaluate_policy(view.arm, view.name, "evaluate", view.out("evaluate"), view.policy(), stage.done)
    return {"output": view.out("evaluate")}


def report_round_evaluate(view: Round, stage: Stage) -> None:
    eval_results(view.arm, view.out("evaluate"), "eval", view.results)
    cost = view.results.get("eval/cost_usd_total")
    if cost is not None:
        view.results["cost_usd"] = view.results.get("critic/cost_usd", 0.0) + cost


def evaluate_policy(arm: Arm, name: str, key: str, out: str, policy: str, done: str) -> None:
    """`policy` generated on the eval set and judged: by run_arm.evaluator when given, else
    rlaif_jax.eval.evaluate with run_arm.judge (or the reward-model protocol gin binds)."""
    s = arm.settings
    if s.evaluator is not None:
        s.evaluator(out_dir=out, policy=arm.local(policy), name=name)
        return
    if not s.eval_set:
        raise ArmError("the evaluate stage needs run_arm.eval_set (AlpacaEval's JSON, or records)")
    # Without run_arm.judge the gin bindings of `evaluate` choose (e.g. the reward-model protocol).
    judge = {"client": s.judge(cache_path=arm.cache("judge"))} if s.judge else {}
    evaluate(
        out_dir=out,
        eval_set=s.eval_set,
        checkpoint=arm.local(policy),
        generator=f"{name}/{arm.paths[key]}",
        labels={"arm": name, "policy": policy, **s.labels},
        **judge,
    )
    if s.judge:
        arm.check_requests(f"{key} judge", out, done, *count_errors(fileio.join(out, "judgments.jsonl")))


def eval_results(arm: Arm, out: str, prefix: str, results) -> None:
    """An evaluation's numbers into the summary, with run_arm.eval_scores' over its
    generations (computed once, into <out>/scores.json)."""
    m = read_json(fileio.join(out, "metrics.json"))
    results.update({f"{prefix}/{k}": m[k] for k in EVAL_KEYS if m.get(k) is not None})
    if arm.settings.eval_scores is None:
        return
    path = fileio.join(out, "scores.json")
    if not fileio.exists(path):
        samples = list(read_records(fileio.join(out, "generations"), DEMONSTRATIONS))
        fileio.write_json(path, dict(arm.settings.eval_scores(samples)))
    results.update({f"{prefix}/{k}": v for k, v in read_json(path).items()})


# -- iterative RLAIF ---------------------------------------------------------------------


def stage_rounds(arm: Arm, stage: Stage) -> dict:
    """Runs (or resumes) every round through the arm's runner (each step a stage
    `round<r>/<step>`, recorded in status.json); a round's critic cost (and its evaluation
    judge's) is summed into `round<r>/cost_usd`."""
    it = arm.settings.iterative
    for r in range(1, it.rounds + 1):
        view = arm.round(r)
        for step in arm.round_stages(r, it):
            arm.runner.run_stage(step, view)
        if "cost_usd" not in view.results:
            view.results["cost_usd"] = view.results.get("critic/cost_usd", 0.0)
    if jax.process_index() == 0:
        fileio.write_json(
            fileio.join(arm.out("rounds"), "summary.json"),
            {k: v for k, v in arm.results.items() if k.startswith("round")},
        )
    return {"output": arm.out("rounds"), "rounds": it.rounds, "policy": arm.round(it.rounds).policy()}


def report_rounds(arm: Arm, stage: Stage) -> None:
    if jax.process_index() == 0:
        arm.results.update(read_json(fileio.join(arm.out("rounds"), "summary.json")))
