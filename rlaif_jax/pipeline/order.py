"""The one module that knows the arm's stage order:

  prompts -> teacher -> [audit] -> sft -> samples -> critic -> preferences -> dpo | reward_model -> ppo -> evaluate

(`dpo` trains run_arm.preference_objective: DPO, ORPO or CPO/SimPO), or KTO on the critic's
ratings instead of its pairwise verdicts: `sft -> samples -> ratings -> kto -> evaluate`
(`ratings`: the critic rates each policy sample and the pair teacher's completion on its own,
labelled desirable / undesirable by a threshold; `kto`: KTO from the SFT policy, which is
its reference),

or, iterative RLAIF, `sft -> rounds -> evaluate`: k rounds of samples -> critic -> preferences
-> DPO, each from the previous round's policy (rlaif_jax.iterative).

prompts and teacher write under data_dir (shared by every arm on that data), the rest under
out_dir. Host-0 stages call APIs, rewrite records or sample on one host's devices: on a
multi-host slice process 0 runs them alone (nothing is requested, or paid for, once per host)
while the others wait. Training stages run on every process over the whole mesh; `samples`
splits its prompts over the hosts, each sampling on its own chips.
"""

from __future__ import annotations

from rlaif_jax.iterative import IterativeSettings
from rlaif_jax.pipeline import stages as S
from rlaif_jax.pipeline.runner import Stage, by_name
from rlaif_jax.pipeline.settings import ArmError, ArmSettings

ARM_STAGES = (
    Stage("prompts", S.stage_prompts, done="stats.json", host0=True, report=S.report_prompts),
    Stage("teacher", S.stage_teacher, inputs=("prompts",), host0=True),
    # The optional teacher-critic gap audit (rlaif_jax.feedback.audit): before anything is
    # trained, the critic compares sft_teacher's completions with audit_against's.
    Stage(
        "audit",
        S.stage_audit,
        outputs=(("audit", "audit"),),
        done="metrics.json",
        host0=True,
        report=S.report_audit,
    ),
    Stage(
        "sft",
        S.stage_sft,
        outputs=(("sft", "sft"), ("sft_data", "sft_data")),
        done="summary.json",
        summary_keys=("step", "loss"),
        report=S.report_training,
    ),
    Stage("samples", S.step_samples, inputs=("sft", "prompts"), outputs=(("samples", "samples"),)),
    Stage(
        "critic",
        S.step_critic,
        inputs=("samples", "teacher"),
        outputs=(("critic", "comparisons"),),
        host0=True,
        report=S.report_critic,
    ),
    Stage(
        "preferences",
        S.step_preferences,
        inputs=("critic",),
        outputs=(("preferences", "preferences"), ("rm_preferences", "preferences_rm")),
        host0=True,
        report=S.report_preferences,
    ),
    Stage(
        "dpo",
        S.step_dpo,
        inputs=("preferences", "sft"),
        outputs=(("dpo", "dpo"),),
        done="summary.json",
        summary_keys=("step", "loss", "rewards/accuracies", "rewards/margins"),
        report=S.report_dpo,
    ),
    # KTO on the critic's ratings: each policy sample and the pair teacher's completion rated
    # on its own (the critic in rating mode, `ratings/JudgeSettings.*`), then labelled by
    # `ratings/rating_labels_stage.threshold` (rlaif_jax.feedback.ratings).
    Stage(
        "ratings",
        S.step_ratings,
        inputs=("samples", "teacher"),
        outputs=(("ratings", "ratings"), ("labelled", "labelled")),
        host0=True,
        report=S.report_ratings,
    ),
    Stage(
        "kto",
        S.stage_kto,
        inputs=("labelled", "sft"),
        outputs=(("kto", "kto"),),
        done="summary.json",
        summary_keys=("step", "loss", "kl", "rewards/chosen", "rewards/rejected", "rewards/margins"),
        report=S.report_training,
    ),
    # Iterative RLAIF: samples -> critic -> preferences -> DPO, k rounds, each from the
    # previous round's policy, under out_dir/rounds/<r>.
    Stage(
        "rounds",
        S.stage_rounds,
        inputs=("sft", "prompts"),
        outputs=(("rounds", "rounds"),),
        done="summary.json",
        report=S.report_rounds,
    ),
    Stage(
        "reward_model",
        S.stage_reward_model,
        inputs=("reward_data", "sft"),
        outputs=(("reward_model", "reward_model"),),
        done="summary.json",
        summary_keys=("step", "loss", "accuracy", "eval/accuracy"),
        report=S.report_training,
    ),
    Stage(
        "ppo",
        S.stage_ppo,
        inputs=("reward_model", "sft", "prompts"),
        outputs=(("ppo", "ppo"),),
        done="summary.json",
        summary_keys=("iteration", "objective/scores", "objective/kl", "objective/rlhf_reward"),
        report=S.report_training,
    ),
    Stage(
        "evaluate",
        S.stage_evaluate,
        outputs=(("evaluate", "eval"), ("evaluate_sft", "eval_sft")),
        done="metrics.json",
        host0=True,
        report=S.report_evaluate,
    ),
)
REGISTRY = by_name(ARM_STAGES)
STAGES = tuple(s.name for s in ARM_STAGES)
OUTPUTS = {k: p for s in ARM_STAGES for k, p in s.outputs}  # output key -> its path under out_dir


def round_stages(r: int, it: IterativeSettings) -> list[Stage]:
    """Round r's steps as stages `round<r>/<step>`, each in its one-round stage's gin scope
    (so `dpo/make_optimizer.learning_rate` holds in every round); the last round is evaluated
    by the arm's own evaluate stage."""
    one = REGISTRY
    steps = [
        Stage(f"round{r}/samples", S.step_samples, inputs=("sft",), scope="samples"),
        Stage(
            f"round{r}/critic", S.step_critic, inputs=("samples",), host0=True, scope="critic", report=S.report_critic
        ),
        Stage(
            f"round{r}/preferences",
            S.step_preferences,
            inputs=("critic",),
            host0=True,
            scope="preferences",
            report=S.report_preferences,
        ),
        Stage(
            f"round{r}/dpo",
            S.step_dpo,
            inputs=("preferences", "sft"),
            done="summary.json",
            scope="dpo",
            summary_keys=one["dpo"].summary_keys,
            report=S.report_dpo,
        ),
    ]
    if it.evaluate_rounds and r < it.rounds:
        steps.append(
            Stage(
                f"round{r}/evaluate",
                S.step_evaluate,
                host0=True,
                done="metrics.json",
                scope="evaluate",
                report=S.report_round_evaluate,
            )
        )
    return steps


def plan(settings: ArmSettings) -> list[Stage]:
    """The stage records an arm walks, in the pipeline's order; refuses a stage list that
    names an unknown stage or breaks the order."""
    unknown = [s for s in settings.stages if s not in STAGES]
    if unknown:
        raise ArmError(f"run_arm.stages: unknown stage(s) {unknown}; stages are {list(STAGES)}")
    order = [STAGES.index(s) for s in settings.stages]
    if order != sorted(order) or len(set(order)) != len(order):
        raise ArmError(
            f"run_arm.stages must follow the pipeline's order {list(STAGES)} once each, got {list(settings.stages)}"
        )
    # The rounds sample, judge and train on their own; a one-round stage beside them would
    # train a second policy from the SFT model that nothing evaluates.
    one_round = ("samples", "critic", "preferences", "dpo", "ratings", "kto", "reward_model", "ppo")
    clash = [st for st in one_round if st in settings.stages]
    if "rounds" in settings.stages and clash:
        raise ArmError(
            f"run_arm.stages: 'rounds' (iterative RLAIF) runs its own samples, critic, preferences and "
            f"DPO every round; leave out {clash}"
        )
    # An arm ends with one policy: KTO trains its own from the SFT model.
    policies = [st for st in ("dpo", "kto", "ppo") if st in settings.stages]
    if "kto" in policies and len(policies) > 1:
        raise ArmError(
            f"run_arm.stages: {policies} each train a policy from the SFT model and the arm evaluates one; "
            "run KTO as its own arm (it can reuse this one's SFT run and samples through run_arm.stage_dirs)"
        )
    bad_dirs = set(settings.stage_dirs) - set(OUTPUTS)
    if bad_dirs:
        raise ArmError(
            f"run_arm.stage_dirs: unknown stage(s) {sorted(bad_dirs)}; stages with outputs are {sorted(OUTPUTS)}"
        )
    return [REGISTRY[name] for name in settings.stages]
