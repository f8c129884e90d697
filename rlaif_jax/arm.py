"""One arm of the paper as one chained, resumable run:

  prompts -> teacher -> sft -> samples -> critic -> preferences -> dpo | reward_model -> ppo -> evaluate

or, iterative RLAIF, `sft -> rounds -> evaluate`: k rounds of samples -> critic -> preferences
-> DPO, each from the previous round's policy (rlaif_jax.iterative_arm).

Each stage is declared once in ARM_STAGES, a record of the stage registry
(rlaif_jax.registry: inputs, outputs, done marker, host 0 or all hosts, summary keys, and
the function), whose runner walks them. A stage calls the library's own run function
(prepare_prompts, teacher_stage, import_paper_completions, train, policy_samples_stage,
critic_stage, preferences_stage, train_ppo, evaluate) inside a gin scope of its name, so an
arm's recipe binds e.g. `sft/make_optimizer.learning_rate = 1e-6` beside
`dpo/make_optimizer.learning_rate = 1e-7`, while unscoped bindings (batch size, max length)
hold for every stage.

Shared data (prompts and teacher completions) lives under `data_dir` and is reused by every
arm that points there; everything the arm trains or judges lives under `out_dir`. A stage
whose output is complete (a manifest, a summary or a metrics file) is not run again, and
API answers are cached per role (teacher-<model>, critic, judge) under cache_dir (default
data_dir/api_cache), so a killed or failed arm is relaunched with the same command and
nothing already paid for is paid again. `status.json` records each stage's state (done,
reused, skipped, failed with the error) as the arm goes; `summary.json` its numbers.

On a multi-host slice every process runs the arm: training stages span all hosts, the
samples stage splits its prompts over them, and the API / record stages run on process 0
while the others wait at a coordination-service barrier.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
import os
import re
import time
from typing import Any, Callable, Mapping, Optional, Sequence

import gin
import jax

from rlaif_jax import fileio
from rlaif_jax.data.records import DEMONSTRATIONS, PROMPTS, read_manifest, read_records, write_records
from rlaif_jax.errors import UserError
from rlaif_jax.fileio import read_json, write_json
from rlaif_jax.registry import Runner, Stage, Status, by_name, is_complete, output_paths

log = logging.getLogger(__name__)


class ArmError(UserError):
    """A recipe that cannot run as written (names the binding to change)."""


def safe_name(model: str) -> str:
    """A model name as a directory name ('gpt-4-0314' stays, 'org/model' -> 'org_model')."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", model).strip("_") or "model"


@dataclasses.dataclass(frozen=True)
class ArmSettings:
    """One arm, as run_arm's gin bindings give it (see run_arm for each field); checked on
    construction, passed whole to the stages."""

    out_dir: str
    data_dir: str
    stages: tuple[str, ...]
    base_model: Optional[str] = None
    prompt_source: Optional[str] = None
    source_teacher: str = "sharegpt-chatgpt"
    teachers: Mapping[str, str] = dataclasses.field(default_factory=dict)
    teacher_imports: Mapping[str, str] = dataclasses.field(default_factory=dict)
    sft_teacher: str = "sharegpt-chatgpt"
    sft_splits: tuple[str, ...] = ("sft",)
    sft_fraction: Optional[float] = None
    pair_teacher: str = "sharegpt-chatgpt"
    critic: Optional[Callable] = None
    audit_against: Optional[str] = None
    eval_set: Optional[str] = None
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
    iterative: Optional[Any] = None  # IterativeSettings when stages has 'rounds'

    def __post_init__(self):
        unknown = [s for s in self.stages if s not in STAGES]
        if unknown:
            raise ArmError(f"run_arm.stages: unknown stage(s) {unknown}; stages are {list(STAGES)}")
        order = [STAGES.index(s) for s in self.stages]
        if order != sorted(order) or len(set(order)) != len(order):
            raise ArmError(
                f"run_arm.stages must follow the pipeline's order {list(STAGES)} once each, got {list(self.stages)}"
            )
        if self.sft_fraction is not None and not 0.0 <= self.sft_fraction <= 1.0:
            raise ArmError(f"run_arm.sft_fraction must be in [0, 1], got {self.sft_fraction}")
        _check_rounds(self.stages)
        bad_dirs = set(self.stage_dirs) - set(_OUT)
        if bad_dirs:
            raise ArmError(
                f"run_arm.stage_dirs: unknown stage(s) {sorted(bad_dirs)}; stages with outputs are {sorted(_OUT)}"
            )


@gin.configurable
def run_arm(
    out_dir: str = gin.REQUIRED,
    data_dir: str = gin.REQUIRED,
    stages: Sequence[str] = gin.REQUIRED,
    base_model: Optional[str] = None,
    prompt_source: Optional[str] = None,
    source_teacher: str = "sharegpt-chatgpt",
    teachers: Optional[Mapping[str, str]] = None,
    teacher_imports: Optional[Mapping[str, str]] = None,
    sft_teacher: str = "sharegpt-chatgpt",
    sft_splits: Sequence[str] = ("sft",),
    sft_fraction: Optional[float] = None,
    pair_teacher: str = "sharegpt-chatgpt",
    critic: Optional[Callable] = None,
    audit_against: Optional[str] = None,
    eval_set: Optional[str] = None,
    judge: Optional[Callable] = None,
    truncate_pairs: bool = True,
    evaluate_sft: bool = False,
    stage_dirs: Optional[Mapping[str, str]] = None,
    labels: Optional[Mapping[str, Any]] = None,
    seed: int = 0,
    num_shards: int = 8,
    host0_timeout_s: float = 48 * 3600.0,
    cache_dir: Optional[str] = None,
    max_request_errors: float = 0.02,
    iterative: Optional[Any] = None,
) -> dict:
    """Runs (or resumes) one arm; returns its summary (also out_dir/summary.json).

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
    critic, judge:   client constructors for the critic stage and the evaluation judge
                     (gin: an unevaluated `@critic/FeedbackClient`; called with cache_path).
    audit_against:   the strongest model available (or the critic itself, as a teacher): the
                     optional 'audit' stage has the critic compare sft_teacher's completions
                     with this model's before any training (rlaif_jax.feedback.audit; its
                     sample and split are `audit/AuditSettings.*`), into out_dir/audit.
    truncate_pairs:  cut the teacher's completion to the policy sample's token budget
                     before judging (the paper), with the SFT policy's tokenizer.
    evaluate_sft:    also evaluate the SFT policy the RL stages started from (out_dir/eval_sft,
                     `eval_sft/*` in the summary): the paper's "SFT 10%" and "+ DPO" columns
                     from one arm, one SFT run.
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
    iterative:       with 'rounds' in stages (iterative RLAIF, rlaif_jax.iterative_arm): the
                     rounds, pairing and DPO reference (default: IterativeSettings() with
                     gin's `IterativeSettings.*` bindings).
    host0_timeout_s: how long the other hosts wait while process 0 runs an API or sampling
                     stage. Multi-host arms need out_dir and data_dir on storage every host
                     sees (gs://).
    """
    settings = ArmSettings(
        out_dir=out_dir,
        data_dir=data_dir,
        stages=tuple(stages),
        base_model=base_model,
        prompt_source=prompt_source,
        source_teacher=source_teacher,
        teachers=dict(teachers or {}),
        teacher_imports=dict(teacher_imports or {}),
        sft_teacher=sft_teacher,
        sft_splits=tuple(sft_splits),
        sft_fraction=sft_fraction,
        pair_teacher=pair_teacher,
        critic=critic,
        audit_against=audit_against,
        eval_set=eval_set,
        judge=judge,
        truncate_pairs=truncate_pairs,
        evaluate_sft=evaluate_sft,
        stage_dirs=dict(stage_dirs or {}),
        labels=dict(labels or {}),
        seed=seed,
        num_shards=num_shards,
        host0_timeout_s=host0_timeout_s,
        cache_dir=cache_dir,
        max_request_errors=max_request_errors,
        iterative=iterative,
    )
    return run_arm_settings(settings)


def run_arm_settings(settings: ArmSettings) -> dict:
    """Runs (or resumes) the arm `settings` describe; returns its summary (also
    out_dir/summary.json). run_arm is this with gin's bindings."""
    if not settings.cache_dir:
        settings = dataclasses.replace(settings, cache_dir=default_cache_dir(settings.data_dir))
    if settings.iterative is None and "rounds" in settings.stages:
        settings = dataclasses.replace(settings, iterative=_iterative_settings(settings.stages, None))
    fileio.makedirs(settings.out_dir)
    return _Arm(settings).run()


def default_cache_dir(data_dir: str) -> str:
    if not fileio.is_url(data_dir):
        return os.path.join(data_dir, "api_cache")
    root = os.environ.get("RLAIF_STAGING_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "rlaif_jax")
    local = os.path.join(root, "api_cache", hashlib.sha256(data_dir.rstrip("/").encode()).hexdigest()[:16])
    log.warning("data_dir %s is remote; API answers are cached on this machine's disk at %s", data_dir, local)
    return local


class _Arm:
    """One arm being run: resolves each stage's inputs to the outputs of the stages before
    it, and collects the summary; the stage functions below do the work."""

    def __init__(self, settings: ArmSettings):
        self.settings = settings
        self.name = os.path.basename(os.path.normpath(settings.out_dir))
        self.results: dict = {}  # filled on process 0 only
        self.runner = Runner(self.name, Status(fileio.join(settings.out_dir, "status.json")), settings.host0_timeout_s)

    # -- paths ----------------------------------------------------------------------------

    def out(self, key: str) -> str:
        """A stage's output: stage_dirs overrides, else under out_dir."""
        return self.settings.stage_dirs.get(key) or fileio.join(self.settings.out_dir, _OUT[key])

    def prompts(self, split: str) -> str:
        return fileio.join(self.settings.data_dir, "prompts", split)

    def teacher_dir(self, model: str, split: str) -> str:
        if model == self.settings.source_teacher:
            return fileio.join(self.settings.data_dir, "demonstrations", split)
        return fileio.join(self.settings.data_dir, "teachers", safe_name(model), "demonstrations", split)

    def cache(self, role: str) -> str:
        """One answer cache per role, shared by every arm on this data: requests are keyed
        by their whole content (model included), so a repeated request is never paid twice."""
        return os.path.join(self.settings.cache_dir, f"{safe_name(role)}.jsonl")

    def needed_teachers(self) -> list[tuple[str, str]]:
        s = self.settings
        need = []
        # The SFT teacher's data even when the arm stops before SFT (an arm that only
        # prepares data for others).
        if s.sft_fraction != 0.0 and "sft" not in s.stage_dirs:
            splits = ("sft", "feedback") if s.sft_fraction is not None else s.sft_splits
            need += [(s.sft_teacher, split) for split in splits]
        if "critic" in s.stages or ("rounds" in s.stages and s.iterative.judges_teacher):
            need.append((s.pair_teacher, "feedback"))
        if "audit" in s.stages and s.audit_against:
            split = _audit_settings().split
            need += [(s.sft_teacher, split), (s.audit_against, split)]
        return list(dict.fromkeys(need))

    def policy(self) -> str:
        """What the arm ends with: the last policy trained (or given), else the base model."""
        s = self.settings
        if "rounds" in s.stages:
            from rlaif_jax.iterative_arm import policy_of

            return policy_of(self, s.iterative.rounds)
        for stage in ("ppo", "dpo", "sft"):
            trains = stage in s.stages and not (stage == "sft" and s.sft_fraction == 0.0)
            if trains or stage in s.stage_dirs:
                return fileio.join(self.out(stage), "hf")
        if s.base_model is None:
            raise ArmError("the arm trains no policy: give run_arm.base_model (evaluated as is)")
        return s.base_model

    def sft_policy(self) -> str:
        s = self.settings
        if ("sft" in s.stages and s.sft_fraction != 0.0) or "sft" in s.stage_dirs:
            return fileio.join(self.out("sft"), "hf")
        if s.base_model is None:
            raise ArmError(
                "no SFT policy: add 'sft' to run_arm.stages, give run_arm.stage_dirs['sft'], or run_arm.base_model"
            )
        return s.base_model

    def local(self, hf_dir: str) -> str:
        """An HF directory on local disk: under a gs:// out_dir the trainers upload each
        export whole and mark it complete, and the base model may live on GCS too; this host
        fetches a copy once."""
        from rlaif_jax.train.rundir import local_hf_dir

        return local_hf_dir(hf_dir, "HF directory")

    def check_requests(self, stage: str, out: str, done_file: str, errors: int, total: int) -> None:
        """Failed API requests above max_request_errors (a bad key, a quota, a wrong model
        name) must not pass for a finished stage that a relaunch would reuse: the output's
        done file goes, the answers received stay cached, and the arm stops naming them."""
        limit = self.settings.max_request_errors
        if total and errors / total > limit:
            fileio.remove(fileio.join(out, done_file), missing_ok=True)
            raise ArmError(
                f"{stage}: {errors} of {total} API requests failed (see {out}: errors.jsonl / the "
                f"records' error fields). The answers received are cached; fix the cause and relaunch, "
                f"and only the failed requests are asked again (or raise run_arm.max_request_errors, "
                f"now {limit})."
            )

    def require(self, path: str, what: str, hint: str) -> str:
        if not is_complete(path):
            raise ArmError(f"{what} not found at {path} ({hint})")
        return path

    def wait(self, what: str) -> None:
        self.runner.wait(what)

    def train_results(self, stage: str, run_dir: str) -> dict:
        """The run's last logged metrics into the arm's summary (for reused runs too);
        returns {} so stage outcomes can splat it."""
        if jax.process_index() != 0:  # the summary is process 0's
            return {}
        summary = read_json(fileio.join(run_dir, "summary.json"))
        keys = ARM_REGISTRY[stage].summary_keys
        self.results.update({f"{stage}/{k}": summary[k] for k in keys if k in summary})
        return {}

    def sft_data_label(self) -> str:
        s = self.settings
        return f"fraction {s.sft_fraction}" if s.sft_fraction is not None else "+".join(s.sft_splits)

    def sft_data(self) -> list[str]:
        s = self.settings
        if s.sft_fraction is None:
            return [
                self.require(
                    self.teacher_dir(s.sft_teacher, split),
                    f"{s.sft_teacher} completions ({split})",
                    "add 'teacher' to run_arm.stages",
                )
                for split in s.sft_splits
            ]
        out = self.out("sft_data")
        if not is_complete(out) and jax.process_index() == 0:
            write_fraction_subset(
                s.data_dir,
                [self.teacher_dir(s.sft_teacher, split) for split in ("sft", "feedback")],
                s.sft_fraction,
                out,
                s.num_shards,
            )
        self.wait("sft_data")
        return [out]

    # -- driver ---------------------------------------------------------------------------

    def run(self) -> dict:
        s = self.settings
        t0 = time.time()
        self.runner.run([ARM_REGISTRY[name] for name in s.stages], self)
        summary = {
            "arm": self.name,
            "policy": self.policy(),
            "stages": list(s.stages),
            "sft_teacher": s.sft_teacher,
            "sft_data": self.sft_data_label(),
            "pair_teacher": s.pair_teacher,
            **s.labels,
            **self.results,
            "seconds": round(time.time() - t0, 1),
        }
        if jax.process_index() == 0:
            write_json(fileio.join(s.out_dir, "summary.json"), summary)
        return summary


# -- stages -----------------------------------------------------------------------------
# Each takes the arm and returns its status.json outcome; a stage whose output is complete
# reuses it (and still reads its numbers into the summary).


def stage_prompts(arm: "_Arm") -> dict:
    from rlaif_jax.data.prompts.prepare import prepare_prompts

    s = arm.settings
    stats = fileio.join(s.data_dir, ARM_REGISTRY["prompts"].done)
    state = "reused"
    if not fileio.exists(stats):  # prepare_prompts writes it last
        if not s.prompt_source:
            raise ArmError("the prompts stage needs run_arm.prompt_source (a ShareGPT / Alpaca / JSONL file)")
        prepare_prompts(s.prompt_source, s.data_dir, num_shards=s.num_shards)
        state = "done"
    arm.results.update({f"prompts/{k}": v for k, v in read_json(stats).items() if k in ("sft", "feedback")})
    return {"state": state, "output": s.data_dir}


def stage_teacher(arm: "_Arm") -> dict:
    from rlaif_jax.data.prompts.imports import import_paper_completions
    from rlaif_jax.feedback.stages import teacher_stage

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
            from rlaif_jax.feedback.client import FeedbackClient

            with gin.config_scope(None), gin.config_scope(s.teachers[model]):
                client = FeedbackClient(model=model, cache_path=arm.cache(f"teacher-{model}"))
                teacher_stage(
                    prompts=arm.prompts(split), out_dir=out, client=client, split=split, num_shards=s.num_shards
                )
            report = read_json(fileio.join(out, "report.json"))
            arm.check_requests(
                f"teacher {model} ({split})",
                out,
                ARM_REGISTRY["teacher"].done,
                report["request_errors"],
                report["requested"],
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


def stage_sft(arm: "_Arm") -> dict:
    from rlaif_jax.data.pipeline.builders import sft_pipeline
    from rlaif_jax.train import SFT
    from rlaif_jax.train.loop import train

    s = arm.settings
    if s.sft_fraction == 0.0:
        return {"state": "skipped", "reason": "sft_fraction 0: the policy is the base model"}
    out = arm.out("sft")
    if is_complete(out):
        return {"state": "reused", "output": out, **arm.train_results("sft", out)}
    if s.base_model is None:
        raise ArmError("the sft stage needs run_arm.base_model (an HF directory)")
    data = arm.sft_data()
    train(
        run_dir=out,
        objective=SFT(),
        init_from=s.base_model,
        train_data=functools.partial(sft_pipeline, data),
        seed=s.seed,
    )
    return {"output": out, "data": data, **arm.train_results("sft", out)}


def stage_samples(arm: "_Arm") -> dict:
    """One sample of the SFT policy per feedback prompt. On n hosts, host i samples every
    n-th prompt on its own chips into samples/parts/, then process 0 joins the parts in
    the prompts' order into the record set the critic reads."""
    from rlaif_jax.feedback.settings import SamplingSettings
    from rlaif_jax.feedback.stages import policy_samples_stage

    s = arm.settings
    out = arm.out("samples")
    if is_complete(out):
        return {"state": "reused", "output": out}
    sample = functools.partial(
        policy_samples_stage,
        hf_dir=arm.local(arm.sft_policy()),
        prompts=arm.prompts("feedback"),
        split="feedback",
        sampling=dataclasses.replace(SamplingSettings(), seed=s.seed),
        source_model=f"{arm.name}/sft",
    )
    i, n = jax.process_index(), jax.process_count()
    if n == 1:
        sample(out_dir=out, num_shards=s.num_shards)
        return {"output": out}
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
            out, DEMONSTRATIONS, [by_id[p] for p in order if p in by_id], num_shards=s.num_shards, provenance=provenance
        )
    return {"output": out, "hosts": n}


def stage_critic(arm: "_Arm") -> dict:
    from rlaif_jax.feedback.settings import JudgeSettings
    from rlaif_jax.feedback.stages import critic_stage, load_comparisons

    s = arm.settings
    out = arm.out("critic")
    state = "reused"
    if not is_complete(out):
        if s.critic is None:
            raise ArmError("the critic stage needs run_arm.critic (e.g. @critic/FeedbackClient)")
        samples = arm.require(arm.out("samples"), "policy samples", "add 'samples' to run_arm.stages")
        teacher = arm.require(
            arm.teacher_dir(s.pair_teacher, "feedback"),
            f"{s.pair_teacher} completions (feedback)",
            "add 'teacher' to run_arm.stages",
        )
        client = s.critic(cache_path=arm.cache("critic"))
        trunc = {"truncate_tokenizer": arm.local(arm.sft_policy())} if s.truncate_pairs else {}
        critic_stage(
            responses_1=samples,
            responses_2=teacher,
            out_dir=out,
            client=client,
            judge=dataclasses.replace(JudgeSettings(), seed=s.seed),
            num_shards=s.num_shards,
            **trunc,
        )
        errors = _count_errors(fileio.join(out, "comparisons.jsonl"))
        arm.check_requests("critic", out, ARM_REGISTRY["critic"].done, *errors)
        state = "done"
    arm.results.update(critic_statistics(load_comparisons(out)))
    return {"state": state, "output": out}


def stage_preferences(arm: "_Arm") -> dict:
    from rlaif_jax.feedback.stages import preferences_stage

    out = arm.out("preferences")
    comps = arm.require(arm.out("critic"), "critic comparisons", "add 'critic' to run_arm.stages")
    state = "reused"
    if not is_complete(out):
        preferences_stage(comparisons=[comps], out_dir=out, num_shards=arm.settings.num_shards)
        state = "done"
    arm.results["preferences/pairs"] = read_json(fileio.join(out, "manifest.json"))["num_records"]
    return {"state": state, "output": out}


def _train_on_preferences(arm: "_Arm", stage: str, objective) -> dict:
    from rlaif_jax.data.pipeline.builders import preference_pipeline
    from rlaif_jax.train.loop import train

    out = arm.out(stage)
    if is_complete(out):
        return {"state": "reused", "output": out, **arm.train_results(stage, out)}
    prefs = arm.require(arm.out("preferences"), "preference records", "add 'preferences' to run_arm.stages")
    train(
        run_dir=out,
        objective=objective,
        init_from=arm.local(arm.sft_policy()),
        train_data=functools.partial(preference_pipeline, prefs),
        seed=arm.settings.seed,
    )
    return {"output": out, **arm.train_results(stage, out)}


def stage_dpo(arm: "_Arm") -> dict:
    from rlaif_jax.train import DPO

    return _train_on_preferences(arm, "dpo", DPO())


def stage_rounds(arm: "_Arm") -> dict:
    from rlaif_jax.iterative_arm import stage_rounds as rounds

    return rounds(arm)


def _iterative_settings(stages: Sequence[str], iterative: Optional[Any]) -> Optional[Any]:
    """The rounds' settings: given, else gin's IterativeSettings() when the arm has rounds."""
    if iterative is None and "rounds" in stages:
        from rlaif_jax.iterative import IterativeSettings

        return IterativeSettings()
    return iterative


def _check_rounds(stages: Sequence[str]) -> None:
    # The rounds sample, judge and train on their own; a one-round stage beside them would
    # train a second policy from the SFT model that nothing evaluates.
    clash = [st for st in ("samples", "critic", "preferences", "dpo", "reward_model", "ppo") if st in stages]
    if "rounds" in stages and clash:
        raise ArmError(
            f"run_arm.stages: 'rounds' (iterative RLAIF) runs its own samples, critic, preferences and "
            f"DPO every round; leave out {clash}"
        )


def stage_reward_model(arm: "_Arm") -> dict:
    from rlaif_jax.train import RewardModel

    return _train_on_preferences(arm, "reward_model", RewardModel())


def stage_ppo(arm: "_Arm") -> dict:
    from rlaif_jax.train.ppo import train_ppo

    out = arm.out("ppo")
    if is_complete(out):
        return {"state": "reused", "output": out, **arm.train_results("ppo", out)}
    rm = arm.require(arm.out("reward_model"), "reward model", "add 'reward_model' to run_arm.stages")
    train_ppo(
        run_dir=out,
        policy=arm.local(arm.sft_policy()),
        reward_model=arm.local(fileio.join(rm, "hf")),
        prompts=arm.prompts("feedback"),
        seed=arm.settings.seed,
    )
    return {"output": out, **arm.train_results("ppo", out)}


def stage_evaluate(arm: "_Arm") -> dict:
    policies = [("evaluate", arm.policy())]
    if arm.settings.evaluate_sft and arm.sft_policy() != policies[0][1]:
        policies.append(("evaluate_sft", arm.sft_policy()))
    states = [_evaluate(arm, key, policy) for key, policy in policies]
    return {"state": "done" if "done" in states else "reused", "output": arm.out("evaluate")}


def _evaluate(arm: "_Arm", key: str, policy: str) -> str:
    from rlaif_jax.eval.evaluate import evaluate

    s = arm.settings
    out = arm.out(key)
    state = "reused"
    if not is_complete(out):
        if not s.eval_set:
            raise ArmError("the evaluate stage needs run_arm.eval_set (AlpacaEval's JSON, or records)")
        # Without run_arm.judge the gin bindings of `evaluate` choose (e.g. the reward-model protocol).
        judge = {"client": s.judge(cache_path=arm.cache("judge"))} if s.judge else {}
        evaluate(
            out_dir=out,
            eval_set=s.eval_set,
            checkpoint=arm.local(policy),
            generator=f"{arm.name}/{_OUT[key]}",
            labels={"arm": arm.name, "policy": policy, **s.labels},
            **judge,
        )
        judgments = fileio.join(out, "judgments.jsonl")
        if s.judge:
            arm.check_requests(f"{key} judge", out, ARM_REGISTRY["evaluate"].done, *_count_errors(judgments))
        state = "done"
    m = read_json(fileio.join(out, "metrics.json"))
    prefix = "eval" if key == "evaluate" else "eval_sft"
    for k in (
        "win_rate",
        "standard_error",
        "lc_win_rate",
        "lc_bootstrap_standard_error",
        "lc_prediction_standard_error",
        "avg_length",
        "cost_usd_total",
    ):
        if m.get(k) is not None:
            arm.results[f"{prefix}/{k}"] = m[k]
    return state


# The arm's stages in the pipeline's order. prompts and teacher write under data_dir (shared
# by every arm on that data), the rest under out_dir. Host-0 stages call APIs, rewrite
# records or sample on one host's devices: on a multi-host slice process 0 runs them alone
# (nothing is requested, or paid for, once per host) while the others wait. Training stages
# run on every process over the whole mesh; `samples` splits its prompts over the hosts,
# each sampling on its own chips.


# -- the optional teacher-critic gap audit (issue 18) -------------------------------------


def _audit_settings():
    """AuditSettings as the audit stage builds them (in its own gin scope), wherever asked:
    the teacher stage needs its split to fetch both models' completions."""
    from rlaif_jax.feedback.audit import AuditSettings

    with gin.config_scope(None), gin.config_scope("audit"):
        return AuditSettings()


def stage_audit(arm: "_Arm") -> dict:
    """The critic compares sft_teacher's completions with audit_against's on a seeded sample
    of one split's prompts, both orders, before anything is trained: a large gap means an
    RLAIF gain over this SFT teacher would mostly be the paper's weak-teacher artefact."""
    from rlaif_jax.feedback.audit import SUMMARY_KEYS, audit_gap
    from rlaif_jax.feedback.settings import JudgeSettings

    s = arm.settings
    out = fileio.join(s.out_dir, ARM_REGISTRY["audit"].output())
    state = "reused"
    if not is_complete(out):
        if not s.audit_against:
            raise ArmError(
                "the audit stage needs run_arm.audit_against (the strongest model available, whose "
                "completions the SFT teacher's are compared with)"
            )
        if s.critic is None:
            raise ArmError("the audit stage needs run_arm.critic (e.g. @critic/FeedbackClient)")
        settings = _audit_settings()
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
        arm.check_requests("audit", out, ARM_REGISTRY["audit"].done, report["api_errors"], report["join"]["sampled"])
        state = "done"
    report = read_json(fileio.join(out, ARM_REGISTRY["audit"].done))
    arm.results.update({f"audit/{k}": report[k] for k in SUMMARY_KEYS if k in report})
    return {"state": state, "output": out, "reading": report["reading"]}


ARM_STAGES = (
    Stage("prompts", stage_prompts, done="stats.json", host0=True),
    Stage("teacher", stage_teacher, inputs=("prompts",), host0=True),
    # The optional teacher-critic gap audit (rlaif_jax.feedback.audit): before anything is
    # trained, the critic compares sft_teacher's completions with audit_against's.
    Stage("audit", stage_audit, inputs=("teacher",), outputs=(("audit", "audit"),), done="metrics.json", host0=True),
    Stage(
        "sft",
        stage_sft,
        inputs=("teacher",),
        outputs=(("sft", "sft"), ("sft_data", "sft_data")),
        done="summary.json",
        summary_keys=("step", "loss"),
    ),
    Stage("samples", stage_samples, inputs=("sft", "prompts"), outputs=(("samples", "samples"),)),
    Stage(
        "critic", stage_critic, inputs=("samples", "teacher", "sft"), outputs=(("critic", "comparisons"),), host0=True
    ),
    Stage("preferences", stage_preferences, inputs=("critic",), outputs=(("preferences", "preferences"),), host0=True),
    Stage(
        "dpo",
        stage_dpo,
        inputs=("preferences", "sft"),
        outputs=(("dpo", "dpo"),),
        done="summary.json",
        summary_keys=("step", "loss", "rewards/accuracies", "rewards/margins"),
    ),
    # Iterative RLAIF (rlaif_jax.iterative_arm): samples -> critic -> preferences -> DPO, k
    # rounds, each from the previous round's policy, under out_dir/rounds/<r>.
    Stage(
        "rounds",
        stage_rounds,
        inputs=("sft", "teacher", "prompts"),
        outputs=(("rounds", "rounds"),),
        done="summary.json",
        summary_keys=(),
    ),
    Stage(
        "reward_model",
        stage_reward_model,
        inputs=("preferences", "sft"),
        outputs=(("reward_model", "reward_model"),),
        done="summary.json",
        summary_keys=("step", "loss", "accuracy", "eval/accuracy"),
    ),
    Stage(
        "ppo",
        stage_ppo,
        inputs=("reward_model", "sft", "prompts"),
        outputs=(("ppo", "ppo"),),
        done="summary.json",
        summary_keys=("iteration", "objective/scores", "objective/kl", "objective/rlhf_reward"),
    ),
    Stage(
        "evaluate",
        stage_evaluate,
        inputs=("ppo", "dpo", "rounds", "sft"),
        outputs=(("evaluate", "eval"), ("evaluate_sft", "eval_sft")),
        done="metrics.json",
        host0=True,
    ),
)
ARM_REGISTRY = by_name(ARM_STAGES)
STAGES = tuple(s.name for s in ARM_STAGES)
# Output key -> its directory under out_dir (run_arm.stage_dirs may place any elsewhere).
_OUT = output_paths(ARM_STAGES)


def _count_errors(jsonl: str) -> tuple[int, int]:
    """(rows with an API error, rows) of a judgments / comparisons JSONL file."""
    rows = fileio.read_jsonl(jsonl)
    return sum(bool(r.get("error")) for r in rows), len(rows)


def critic_statistics(comparisons: Sequence[Mapping]) -> dict:
    """The paper's critic statistic: how often the critic preferred the policy's sample
    (response 1) over the teacher's completion (GPT-4 preferred Llama-7B SFT over ChatGPT
    14.3% of the time, Claude-v1 30.2%); ties count half, invalid answers apart."""
    from rlaif_jax.eval.winrate import verdict_win_rate

    wr = verdict_win_rate([c["verdict"] for c in comparisons], policy_is="first")
    return {
        "critic/policy_preferred": wr.win_rate,
        "critic/policy_preferred_se": wr.standard_error,
        "critic/judged": wr.n_scored,
        "critic/ties": wr.n_ties,
        "critic/invalid": wr.n_invalid,
    }


def write_fraction_subset(
    data_dir: str, teacher_dirs: Sequence[str], fraction: float, out: str, num_shards: int = 1
) -> dict:
    """Demonstrations for the first `fraction` of all prompts (SFT then feedback split, in
    the order prepare_prompts kept) -> one record set. The cut is on prompts, so a teacher
    that dropped some completions (finish_reason != stop) keeps its gaps."""
    order = [
        r["prompt_id"] for s in ("sft", "feedback") for r in read_records(fileio.join(data_dir, "prompts", s), PROMPTS)
    ]
    keep = set(order[: int(len(order) * fraction)])
    demos = [r for d in teacher_dirs for r in read_records(d, DEMONSTRATIONS) if r["prompt_id"] in keep]
    if not demos:
        raise ArmError(
            f"sft_fraction {fraction} of {len(order)} prompts leaves no demonstrations in {list(teacher_dirs)}"
        )
    return write_records(
        out,
        DEMONSTRATIONS,
        demos,
        num_shards=num_shards,
        provenance={
            "stage": "sft_fraction",
            "fraction": fraction,
            "prompts_total": len(order),
            "prompts_kept": len(keep),
            "sources": [fileio.abspath(d) for d in teacher_dirs],
        },
    )
