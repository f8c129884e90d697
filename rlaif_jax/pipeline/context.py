"""What a stage is handed besides its record: the arm being run (settings, paths, the
summary being collected) and, for the feedback stages, a round of it.

The one-round arm is round 1 of the iterative arm: its samples, critic, preferences and DPO
stages run the same step functions on Round(arm, 1), whose outputs are the one-round paths
(out_dir/samples, comparisons, preferences, dpo) and whose stage names stay today's, so
existing run directories resume. Round r of a 'rounds' arm lives under out_dir/rounds/<r>/.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import hashlib
import itertools
import logging
import os
import re
from typing import Any, Optional

import gin
import jax

from rlaif_jax import fileio
from rlaif_jax.data.records import DEMONSTRATIONS, PROMPTS, read_records, write_records
from rlaif_jax.feedback.audit import AuditSettings
from rlaif_jax.fileio import read_json
from rlaif_jax.iterative import IterativeSettings
from rlaif_jax.models.remote import local_hf_dir
from rlaif_jax.pipeline.runner import Runner, Stage, is_complete
from rlaif_jax.pipeline.settings import ArmError, ArmSettings

log = logging.getLogger(__name__)

# Input key -> (what it is, how to get it): the runner's one error for a missing input.
INPUTS = {
    "prompts": ("prompts", "add 'prompts' to run_arm.stages"),
    "teacher": ("the pair teacher's completions (feedback)", "add 'teacher' to run_arm.stages"),
    "sft": ("the policy the stage starts from", "add 'sft' to run_arm.stages or give run_arm.stage_dirs['sft']"),
    "samples": ("policy samples", "add 'samples' to run_arm.stages"),
    "critic": ("critic comparisons", "add 'critic' to run_arm.stages"),
    "preferences": ("preference records", "add 'preferences' to run_arm.stages"),
    "reward_data": ("the reward model's preference records", "add 'preferences' to run_arm.stages"),
    "labelled": ("labelled completions (the critic's ratings)", "add 'ratings' to run_arm.stages"),
    "reward_model": ("reward model", "add 'reward_model' to run_arm.stages"),
}


def safe_name(model: str) -> str:
    """A model name as a directory name ('gpt-4-0314' stays, 'org/model' -> 'org_model')."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", model).strip("_") or "model"


def default_cache_dir(data_dir: str) -> str:
    if not fileio.is_url(data_dir):
        return os.path.join(data_dir, "api_cache")
    root = os.environ.get("RLAIF_STAGING_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "rlaif_jax")
    local = os.path.join(root, "api_cache", hashlib.sha256(data_dir.rstrip("/").encode()).hexdigest()[:16])
    log.warning("data_dir %s is remote; API answers are cached on this machine's disk at %s", data_dir, local)
    return local


def audit_settings() -> AuditSettings:
    """AuditSettings as the audit stage builds them (in its own gin scope), wherever asked:
    the teacher stage needs its split to fetch both models' completions."""
    with gin.config_scope(None), gin.config_scope("audit"):
        return AuditSettings()


def feedback_seed(seed: int, i: int, j: Optional[int] = None) -> int:
    """The critic's seed for sample i against the teacher (j None) or against sample j (the
    miniature's formula, which every arm follows); round r adds 7919 * (r - 1), so round 1
    reproduces the one-round arm's judgments."""
    return seed + 1000 * i + (0 if j is None else 100 * j)


def sample_seed(seed: int, k: int, r: int = 1) -> int:
    """Policy sample k's sampling seed in round r (round 1's first: the arm's seed)."""
    return seed + 1000 * k + 7919 * (r - 1)


@dataclasses.dataclass(frozen=True)
class Design:
    """What a round's feedback stages make: policy samples per prompt, which of them the critic
    judges against the teacher, which pairs of them against each other, and what those pairs
    are for (best_worst: DPO's best-vs-worst pairs; rm_pairs: the reward model's data)."""

    samples: int
    teacher_samples: tuple[int, ...]
    sample_pairs: tuple[tuple[int, int], ...] = ()
    best_worst: bool = False
    rm_pairs: bool = False

    @staticmethod
    def of_arm(s: ArmSettings) -> "Design":
        if s.trains_on_sample_pairs:
            return Design(
                samples=max(s.feedback_samples, s.rm_samples),
                teacher_samples=tuple(range(s.feedback_samples)),
                sample_pairs=tuple(itertools.combinations(range(s.rm_samples), 2)),
                rm_pairs=True,
            )
        return Design(samples=s.feedback_samples, teacher_samples=tuple(range(s.feedback_samples)))

    @staticmethod
    def of_rounds(it: IterativeSettings) -> "Design":
        return Design(
            samples=it.samples,
            teacher_samples=tuple(range(it.samples)) if it.judges_teacher else (),
            sample_pairs=tuple(it.sample_pairs()),
            best_worst=it.judges_samples,
        )


class Prefixed(collections.abc.MutableMapping):
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


class Arm:
    """One arm being run: resolves each stage's inputs and outputs to paths and collects the
    summary; the stage functions (rlaif_jax.pipeline.stages) do the work."""

    def __init__(self, settings: ArmSettings, runner: Runner, registry: dict, round_stages):
        """registry: stage name -> record; round_stages(r, it): round r's step records (both
        rlaif_jax.pipeline.order's, which knows the order)."""
        self.settings = settings
        self.round_stages = round_stages
        # Output key -> its directory under out_dir (a round's under rounds/<r>), from the records.
        self.paths = {k: p for stage in registry.values() for k, p in stage.outputs}
        self.name = runner.name
        self.results: dict = {}  # filled on process 0 only
        self.runner = runner
        self.registry = registry

    # -- paths ----------------------------------------------------------------------------

    def out(self, key: str) -> str:
        """A stage's output: stage_dirs overrides, else under out_dir."""
        return self.settings.stage_dirs.get(key) or fileio.join(self.settings.out_dir, self.paths[key])

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
        if "critic" in s.stages or "ratings" in s.stages or ("rounds" in s.stages and s.iterative.judges_teacher):
            need.append((s.pair_teacher, "feedback"))
        if "audit" in s.stages and s.audit_against:
            split = audit_settings().split
            need += [(s.sft_teacher, split), (s.audit_against, split)]
        return list(dict.fromkeys(need))

    def trains_sft(self) -> bool:
        s = self.settings
        return ("sft" in s.stages and s.sft_fraction != 0.0) or "sft" in s.stage_dirs

    def policy(self) -> str:
        """What the arm ends with: the last policy trained (or given), else the base model."""
        s = self.settings
        if "rounds" in s.stages:
            return self.round(s.iterative.rounds).policy()
        for stage in ("ppo", "dpo", "kto"):
            if stage in s.stages or stage in s.stage_dirs:
                return fileio.join(self.out(stage), "hf")
        if self.trains_sft():
            return fileio.join(self.out("sft"), "hf")
        if s.base_model is None:
            raise ArmError("the arm trains no policy: give run_arm.base_model (evaluated as is)")
        return s.base_model

    def sft_policy(self) -> str:
        if self.trains_sft():
            return fileio.join(self.out("sft"), "hf")
        if self.settings.base_model is None:
            raise ArmError(
                "no SFT policy: add 'sft' to run_arm.stages, give run_arm.stage_dirs['sft'], or run_arm.base_model"
            )
        return self.settings.base_model

    def local(self, hf_dir: str) -> str:
        """An HF directory on local disk: under a gs:// out_dir the trainers upload each
        export whole and mark it complete, and the base model may live on GCS too; this host
        fetches a copy once."""
        return local_hf_dir(hf_dir, "HF directory")

    def round(self, r: int) -> "Round":
        """Round r's view; round 1 of a one-round arm writes the one-round paths."""
        it = self.settings.iterative
        if "rounds" in self.settings.stages:
            return Round(self, r, Design.of_rounds(it), it)
        return Round(self, r, Design.of_arm(self.settings), None)

    # -- what the runner asks -------------------------------------------------------------

    def outputs(self, stage: Stage) -> list[str]:
        s = self.settings
        if stage.name in ("samples", "critic", "preferences", "ratings"):
            return self.round(1).outputs(stage)
        if stage.name == "teacher":
            return [self.teacher_dir(m, split) for m, split in self.needed_teachers()]
        if stage.name == "sft":
            return [self.out("sft")] if s.sft_fraction != 0.0 else []
        if stage.name == "evaluate":
            return [self.out(key) for key, _ in self.evaluations()]
        if stage.name in ("audit", "dpo", "kto", "rounds", "reward_model", "ppo"):
            return [self.out(stage.name)]
        return []  # prompts: its own done file (stats.json)

    def input_path(self, key: str) -> Optional[str]:
        if key == "prompts":
            return self.prompts("feedback")
        if key in ("reward_model", "labelled"):
            return self.out(key)
        return self.round(1).input_path(key)

    def input_name(self, key: str) -> str:
        return INPUTS[key][0]

    def input_hint(self, key: str) -> str:
        return INPUTS[key][1]

    def evaluations(self) -> list[tuple[str, str]]:
        """(output key, policy) of each evaluation: the arm's policy, and its SFT policy too
        with evaluate_sft."""
        out = [("evaluate", self.policy())]
        if self.settings.evaluate_sft and self.sft_policy() != out[0][1]:
            out.append(("evaluate_sft", self.sft_policy()))
        return out

    # -- checks shared by the stages --------------------------------------------------------

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

    def train_results(self, stage: str, run_dir: str, results: Any = None) -> None:
        """The run's last logged metrics into the summary (for reused runs too)."""
        if jax.process_index() != 0:  # the summary is process 0's
            return
        summary = read_json(fileio.join(run_dir, "summary.json"))
        keys = self.registry[stage].summary_keys
        (self.results if results is None else results).update(
            {f"{stage}/{k}": summary[k] for k in keys if k in summary}
        )

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


class Round:
    """Round r of an arm as the feedback stages see it: its outputs, the policy it samples
    from and starts DPO at (round r-1's; round 1's the SFT policy), the seeds of its samples
    and judgments, its numbers (prefixed `round<r>/` in a 'rounds' arm)."""

    def __init__(self, arm: Arm, r: int, design: Design, it: Optional[IterativeSettings]):
        self.arm, self.r, self.design, self.it = arm, r, design, it
        self.settings = arm.settings
        if it is None:  # the one-round arm
            self.name, self.results = arm.name, arm.results
        else:
            self.name, self.results = f"{arm.name}/round{r}", Prefixed(arm.results, f"round{r}/")

    def out(self, key: str) -> str:
        if self.it is None:
            return self.arm.out(key)
        return fileio.join(self.arm.out("rounds"), str(self.r), self.arm.paths[key])

    @property
    def _nested(self) -> bool:
        # One sample judged against the teacher keeps the one-round arm's flat layout.
        d = self.design
        return self.it is not None or d.samples > 1 or bool(d.sample_pairs)

    def sample_dir(self, k: int) -> str:
        return fileio.join(self.out("samples"), str(k)) if self._nested else self.out("samples")

    def teacher_comparisons(self, k: int) -> str:
        return fileio.join(self.out("critic"), f"teacher-{k}") if self._nested else self.out("critic")

    def sample_comparisons(self, i: int, j: int) -> str:
        return fileio.join(self.out("critic"), f"samples-{i}-{j}")

    def rating_comparisons(self, k: int) -> str:
        """The critic's ratings of sample k and the pair teacher's completion (rating mode)."""
        return fileio.join(self.out("ratings"), f"teacher-{k}") if self._nested else self.out("ratings")

    def best_worst(self) -> str:
        return fileio.join(self.out("critic"), "best_worst")

    def judgments(self) -> list[tuple[str, str, str, int, Optional[int]]]:
        """(responses_1, responses_2, out_dir, i, j) of every critic judgment of the round."""
        teacher = self.arm.teacher_dir(self.settings.pair_teacher, "feedback")
        out = [(self.sample_dir(k), teacher, self.teacher_comparisons(k), k, None) for k in self.design.teacher_samples]
        out += [
            (self.sample_dir(i), self.sample_dir(j), self.sample_comparisons(i, j), i, j)
            for i, j in self.design.sample_pairs
        ]
        return out

    def critic_seed(self, i: int, j: Optional[int] = None) -> int:
        return feedback_seed(self.settings.seed, i, j) + 7919 * (self.r - 1)

    def sample_seed(self, k: int) -> int:
        return sample_seed(self.settings.seed, k, self.r)

    def start(self) -> str:
        """The policy this round samples from and starts DPO at: round r-1's."""
        return self.arm.sft_policy() if self.r == 1 else self.arm.round(self.r - 1).policy()

    def start_run(self) -> Optional[str]:
        """The training run of start(), whose completeness is checked (None: a given model)."""
        if self.r > 1:
            return self.arm.round(self.r - 1).out("dpo")
        return self.arm.out("sft") if self.arm.trains_sft() else None

    def policy(self) -> str:
        """This round's DPO policy (HF directory)."""
        return fileio.join(self.out("dpo"), "hf")

    def reference(self) -> str:
        """The DPO reference: the SFT model, or (reference 'previous') round r-1's policy."""
        ref = self.it.reference_round(self.r) if self.it is not None else 0
        return self.arm.sft_policy() if ref == 0 else self.arm.round(ref).policy()

    def preference_sources(self) -> list[str]:
        """DPO's pairs: each sample judged against the teacher, and the best-vs-worst pairs."""
        out = [self.teacher_comparisons(k) for k in self.design.teacher_samples]
        return out + ([self.best_worst()] if self.design.best_worst else [])

    def reward_sources(self) -> list[str]:
        """The reward model's pairs: DPO's, and with rm_pairs each two samples' verdict."""
        extra = [self.sample_comparisons(i, j) for i, j in self.design.sample_pairs] if self.design.rm_pairs else []
        return self.preference_sources() + extra

    def reward_data(self) -> str:
        return self.out("rm_preferences") if self.design.rm_pairs else self.out("preferences")

    # -- what the runner asks -------------------------------------------------------------

    def outputs(self, stage: Stage) -> list[str]:
        step = stage.scope or stage.name
        if step == "samples":
            return [self.sample_dir(k) for k in range(self.design.samples)]
        if step == "critic":
            return [o for _, _, o, _, _ in self.judgments()] + ([self.best_worst()] if self.design.best_worst else [])
        if step == "preferences":
            return [self.out("preferences")] + ([self.out("rm_preferences")] if self.design.rm_pairs else [])
        if step == "ratings":
            return [self.rating_comparisons(k) for k in self.design.teacher_samples] + [self.out("labelled")]
        return [self.out(step)]

    def input_path(self, key: str) -> Optional[str]:
        if key == "sft":
            return self.start_run()
        if key == "samples":
            return self.sample_dir(self.design.samples - 1)
        if key == "teacher":
            return self.arm.teacher_dir(self.settings.pair_teacher, "feedback") if self.design.teacher_samples else None
        if key == "critic":
            return self.judgments()[-1][2]
        if key == "preferences":
            return self.out("preferences")
        if key == "reward_data":
            return self.reward_data()
        return self.arm.input_path(key)

    def input_name(self, key: str) -> str:
        return INPUTS[key][0]

    def input_hint(self, key: str) -> str:
        return INPUTS[key][1]


def write_fraction_subset(
    data_dir: str, teacher_dirs: list[str], fraction: float, out: str, num_shards: int = 1
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
