"""One arm's settings: a frozen dataclass that is itself gin's configurable, under the name
`run_arm` the recipes bind (`run_arm.stages = [...]`), so a value reaches a stage the same
way whether a user's recipe or a campaign (the miniature) sets it."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Optional

import gin

from rlaif_jax.errors import UserError
from rlaif_jax.iterative import IterativeSettings


class ArmError(UserError):
    """A recipe that cannot run as written (names the binding to change)."""


# The objectives the `dpo` stage can train on the preference records (rlaif_jax.train): DPO
# from the SFT policy against it as the reference; ORPO and CPO (SimPO, AlphaPO by
# `dpo/CPO.loss_type`) from the same policy, reference-free.
PREFERENCE_OBJECTIVES = ("dpo", "orpo", "cpo")


@gin.configurable("run_arm")
@dataclasses.dataclass(frozen=True)
class ArmSettings:
    """One arm of the paper (`run_arm.*` in a recipe); checked on construction (the stage
    list against the pipeline's order by rlaif_jax.pipeline.order.plan), passed whole to the
    stages.

    stages:          an ordered subset of STAGES ('audit' and 'rounds' run only when named);
                     what is left out must exist already (in data_dir, or at
                     stage_dirs[stage], e.g. {'sft': 'runs/x/sft'} to reuse another arm's
                     SFT run).
    base_model:      HF directory of the base model (SFT starts there; evaluated as is
                     when the arm trains nothing).
    prompt_source:   what `prompts` prepares (ShareGPT / Alpaca / JSONL ...; the
                     `prompts/prepare_prompts` bindings choose format and split fraction).
    source_teacher:  the model whose replies the prompt source carries (ShareGPT: GPT-3.5);
                     its completions are data_dir/demonstrations/<split>.
    teachers:        model name -> gin scope: the teacher stage asks that model for the
                     completions the arm needs, building FeedbackClient and calling
                     teacher_stage inside the scope alone (so `claude/teacher_stage.temperature
                     = 1.0` and `claude/FeedbackClient.base_url = ...` hold for that teacher).
    teacher_imports: model name -> released completions file (the paper's JSON), imported
                     instead of asked for.
    sft_teacher, sft_splits: SFT data: ('sft',) is the paper's 10%, ('sft', 'feedback') 100%.
    sft_fraction:    instead of splits: the first fraction of all prompts, in order (the
                     paper's data-scaling curve); 0 trains nothing and evaluates the base.
    pair_teacher:    whose completions the policy's samples are compared to by the critic.
    preference_objective: what the `dpo` stage trains on the preference pairs: 'dpo' (the
                     paper), 'orpo' or 'cpo' (reference-free; `cpo` with `dpo/CPO.loss_type =
                     'simpo'` is SimPO). Built in the stage's gin scope (`dpo/ORPO.beta`); the
                     stage, its status.json entry and out_dir/dpo keep their name whatever it
                     trains (docs/objectives.md).
    feedback_samples: policy samples per feedback prompt, each judged against pair_teacher's
                     completion (DPO's pairs and the reward model's; the paper: 1).
    rm_sample_pairs: the reward model also learns the critic's verdict between each two policy
                     samples of a feedback prompt (InstructGPT's ranking of several samples).
                     PPO asks the reward model to rank the policy's own answers to one prompt,
                     which sample-vs-teacher pairs teach only indirectly: in the miniature
                     (rlaif_jax.miniature) a reward model on those alone stayed near chance on
                     held-out pairs and PPO gained nothing. Off by default (the paper's reward
                     model learns the DPO pairs alone); the paper's PPO recipe turns it on.
    rm_samples:      how many policy samples per prompt those pairs draw on (all pairs of
                     them; the first feedback_samples shared with DPO's pairs).
    critic, judge:   client constructors for the critic stage and the evaluation judge
                     (gin: an unevaluated `@critic/FeedbackClient`; called with cache_path).
                     The `ratings` stage (KTO's data) asks the same critic in rating mode.
    audit_against:   the strongest model available (or the critic itself, as a teacher): the
                     optional 'audit' stage has the critic compare sft_teacher's completions
                     with this model's before any training (rlaif_jax.feedback.audit; its
                     sample and split are `audit/AuditSettings.*`), into out_dir/audit.
    eval_set:        AlpacaEval's JSON (or records) the evaluate stage generates on.
    evaluator:       evaluator(out_dir=, policy=, name=) judges a policy in place of
                     rlaif_jax.eval.evaluate (the miniature's pairwise judge against its world's
                     reference answers); writes out_dir/metrics.json last, with generations/.
    eval_scores:     an extra evaluation: eval_scores(samples) -> {name: number}, called with
                     the policy's generations (records with prompt and completion); written to
                     <eval dir>/scores.json and into the summary as eval/<name> (the synthetic
                     world's true task score).
    truncate_pairs:  cut the teacher's completion to the policy sample's token budget
                     before judging (the paper), with the SFT policy's tokenizer.
    evaluate_sft:    also evaluate the SFT policy the RL stages started from (out_dir/eval_sft,
                     `eval_sft/*` in the summary): the paper's "SFT 10%" and "+ DPO" columns
                     from one arm, one SFT run.
    stage_dirs:      output key -> where it lives instead of under out_dir (another arm's).
    labels:          copied into the summary and the evaluation's metrics.
    num_shards:      shards of every record set the arm writes; each host of a multi-host
                     slice trains on its own shards, so at least the number of hosts.
    cache_dir:       the API answer caches (local disk: they are appended to as answers
                     arrive); default data_dir/api_cache, or for a gs:// data_dir a directory
                     under $RLAIF_STAGING_DIR (else ~/.cache/rlaif_jax). A cache on a
                     preemptible VM's disk dies with it: ask the APIs from a lasting machine.
    max_request_errors: the fraction of a teacher / critic / judge stage's API requests that
                     may fail (after the client's retries) and still count as done. Above
                     it the stage's output is marked unfinished and the arm stops, naming
                     the errors file; answers received stay cached, so the relaunch asks
                     only the failed requests again.
    iterative:       with 'rounds' in stages (iterative RLAIF): the rounds, pairing and DPO
                     reference (default: IterativeSettings() with gin's bindings).
    host0_timeout_s: how long the other hosts wait while process 0 runs an API or sampling
                     stage. Multi-host arms need out_dir and data_dir on storage every host
                     sees (gs://).
    """

    out_dir: str = gin.REQUIRED
    data_dir: str = gin.REQUIRED
    stages: tuple[str, ...] = gin.REQUIRED
    base_model: Optional[str] = None
    prompt_source: Optional[str] = None
    source_teacher: str = "sharegpt-chatgpt"
    teachers: Mapping[str, str] = dataclasses.field(default_factory=dict)
    teacher_imports: Mapping[str, str] = dataclasses.field(default_factory=dict)
    sft_teacher: str = "sharegpt-chatgpt"
    sft_splits: tuple[str, ...] = ("sft",)
    sft_fraction: Optional[float] = None
    pair_teacher: str = "sharegpt-chatgpt"
    preference_objective: str = "dpo"
    feedback_samples: int = 1
    rm_sample_pairs: bool = False
    rm_samples: int = 4
    critic: Optional[Callable] = None
    audit_against: Optional[str] = None
    eval_set: Optional[str] = None
    evaluator: Optional[Callable] = None
    eval_scores: Optional[Callable] = None
    judge: Optional[Callable] = None
    truncate_pairs: bool = True
    evaluate_sft: bool = False
    stage_dirs: Mapping[str, str] = dataclasses.field(default_factory=dict)
    labels: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    seed: int = 0
    num_shards: int = 8
    host0_timeout_s: float = 48 * 3600.0
    cache_dir: Optional[str] = None  # None: default_cache_dir(data_dir)
    max_request_errors: float = 0.02
    iterative: Optional[IterativeSettings] = None

    def __post_init__(self):
        # gin hands lists and its own dict type: freeze them, so the settings hash and compare.
        for name in ("stages", "sft_splits"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        for name in ("teachers", "teacher_imports", "stage_dirs", "labels"):
            object.__setattr__(self, name, dict(getattr(self, name) or {}))
        if self.sft_fraction is not None and not 0.0 <= self.sft_fraction <= 1.0:
            raise ArmError(f"run_arm.sft_fraction must be in [0, 1], got {self.sft_fraction}")
        if self.preference_objective not in PREFERENCE_OBJECTIVES:
            raise ArmError(
                f"run_arm.preference_objective = {self.preference_objective!r}: one of {list(PREFERENCE_OBJECTIVES)}"
            )
        for name in ("feedback_samples", "rm_samples"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ArmError(f"run_arm.{name} must be a whole number >= 1, got {getattr(self, name)!r}")
        if self.trains_on_sample_pairs and self.rm_samples < 2:
            raise ArmError(
                f"run_arm.rm_sample_pairs needs two or more samples per prompt to pair, but "
                f"run_arm.rm_samples = {self.rm_samples}; raise it or set run_arm.rm_sample_pairs = False"
            )

    @property
    def trains_on_sample_pairs(self) -> bool:
        """Whether the reward model this arm trains learns sample-vs-sample pairs too."""
        return self.rm_sample_pairs and "reward_model" in self.stages
