"""The miniature's iterative-RLAIF arm (dpo_weak_10_iter): k rounds from SFT weak 10%, each
sampling the latest policy on the feedback prompts, judged by the critic (rlaif_jax.iterative's
pairings), DPO from the latest policy, then evaluated like every arm: one row per round.

Round r lives under runs/<arm>/rounds/<r>/{samples, comparisons, preferences, dpo} and
eval/<arm>/round<r>/; each step is a registry stage `round<r>/<step>` with the done markers
of the one-round arms, so a killed run resumes mid-round and the critic's answers come from
the same cache. With the default settings (pairing 'teacher', 2 samples, the SFT reference)
round 1 is the one-round arm dpo_weak_10 again: the same samples, seeds and judgments.
"""

from __future__ import annotations

import dataclasses
import json
import os

from rlaif_jax.feedback.stages import load_comparisons, preferences_stage
from rlaif_jax.iterative import (
    IterativeSettings,
    comparison_sets,
    preference_sources,
    round_dir,
    write_best_vs_worst,
)
from rlaif_jax.registry import Runner, Stage, Status, is_complete


@dataclasses.dataclass(frozen=True)
class RoundArm:
    """Round r of a miniature arm, as the miniature's stage functions see an arm."""

    parent: object  # rlaif_jax.miniature._Arm
    r: int
    it: IterativeSettings

    @property
    def world(self):
        return self.parent.world

    @property
    def name(self) -> str:
        return f"{self.parent.name}/round{self.r}"

    @property
    def label(self) -> str:
        return f"{self.parent.label}, round {self.r}"

    def dir(self, *parts: str) -> str:
        return os.path.join(round_dir(self.world.path("runs", self.parent.name), self.r), *parts)

    def out(self, key: str) -> str:
        if key == "sft":  # the run this round starts from: the previous round's DPO, or SFT
            return self.parent.out("sft") if self.r == 1 else dataclasses.replace(self, r=self.r - 1).out("dpo")
        if key in ("evaluate", "judge"):
            return self.world.path(
                "eval", self.parent.name, f"round{self.r}", "generations" if key == "evaluate" else "judgments"
            )
        return self.dir({"policy": "dpo", "dpo": "dpo", "preferences": "preferences"}[key])

    def samples(self, k: int) -> str:
        return self.dir("samples", str(k))

    def seed(self, *indices: int) -> int:
        # Round 1's seeds are the one-round arm's, so it reproduces its judgments.
        from rlaif_jax.miniature import feedback_seed

        return feedback_seed(self.world.settings.seed, *indices) + 7919 * (self.r - 1)

    def reference_run(self) -> str:
        """The run whose policy is this round's DPO reference."""
        ref = self.it.reference_round(self.r)
        return self.parent.out("sft") if ref == 0 else dataclasses.replace(self, r=ref).out("dpo")

    def sets(self) -> list[tuple[str, str, str]]:
        teacher = self.world.path("data", self.parent.teacher, "feedback")
        return comparison_sets(
            self.it, [self.samples(k) for k in range(self.it.samples)], teacher, self.dir("comparisons")
        )


def settings_of(arm) -> IterativeSettings:
    return arm.world.settings.iterative or IterativeSettings()


def rounds_of(arm) -> list[RoundArm]:
    """Each round of an iterative arm, in order."""
    it = settings_of(arm)
    return [RoundArm(arm, r, it) for r in range(1, it.rounds + 1)]


# -- a round's steps ------------------------------------------------------------------------


def step_samples(view: RoundArm) -> dict:
    from rlaif_jax.miniature import _sample

    made = []
    for k in range(view.it.samples):
        if not is_complete(view.samples(k)):
            source = view.parent.start if view.r == 1 else f"{view.parent.name}/round{view.r - 1}"
            _sample(
                os.path.join(view.out("sft"), "hf"),
                view.world.path("data", "prompts", "feedback"),
                view.samples(k),
                temperature=1.0,
                top_p=0.9,
                seed=view.seed(k),
                source_model=source,
            )
            made.append(k)
    return {"state": "done" if made else "reused", "output": view.dir("samples")}


def step_critic(view: RoundArm) -> dict:
    from rlaif_jax.miniature import _judge

    made = []
    for first, second, out in view.sets():
        if not is_complete(out):
            # teacher-<k> is judged with the one-round arm's seed for sample k; samples-<i>-<j> with its own.
            idx = [int(x) for x in os.path.basename(out).split("-")[1:]]
            _judge(view.world, "critic", first, second, out, seed=view.seed(*idx))
            made.append(out)
    if view.it.judges_samples:
        bvw = view.dir("comparisons", "best_worst")
        if not is_complete(bvw):
            write_best_vs_worst([o for _, _, o in view.sets() if os.path.basename(o).startswith("samples-")], bvw)
            made.append(bvw)
    return {"state": "done" if made else "reused", "output": view.dir("comparisons")}


def step_preferences(view: RoundArm) -> dict:
    out = view.out("preferences")
    if is_complete(out):
        return {"state": "reused", "output": out}
    preferences_stage(comparisons=preference_sources(view.it, view.dir("comparisons")), out_dir=out)
    return {"output": out}


def step_dpo(view: RoundArm) -> dict:
    """DPO from the previous round's policy; the reference is the SFT policy or that one."""
    from rlaif_jax.miniature import _train_on_preferences
    from rlaif_jax.train import DPO

    s = view.world.settings
    ref = view.reference_run()
    outcome = _train_on_preferences(
        view,
        "dpo",
        DPO(beta=s.dpo_beta, rpo_alpha=s.dpo_rpo_alpha),
        s.dpo_epochs,
        s.dpo_lr,
        reference_from=None if ref == view.out("sft") else os.path.join(ref, "hf"),
    )
    return {**outcome, "init_from": view.out("sft"), "reference": ref}


def step_evaluate(view: RoundArm) -> dict:
    from rlaif_jax.miniature import stage_evaluate

    return stage_evaluate(view)


def round_stages(r: int) -> list[Stage]:
    """Round r's steps as registry stages, each in its one-round stage's gin scope."""
    return [
        Stage(f"round{r}/samples", step_samples, scope="samples"),
        Stage(f"round{r}/critic", step_critic, scope="critic"),
        Stage(f"round{r}/preferences", step_preferences, scope="preferences"),
        Stage(f"round{r}/dpo", step_dpo, done="summary.json", scope="dpo"),
        Stage(f"round{r}/evaluate", step_evaluate, scope="evaluate"),
    ]


def stage_rounds(arm) -> dict:
    """Runs (or resumes) every round of an iterative arm; writes runs/<arm>/rounds/summary.json
    (per round: the critic's preference for the policy over the teacher, the pairs trained on)."""
    from rlaif_jax.miniature import critic_policy_preferred

    runner = Runner(arm.name, Status(None), timeout_s=0.0)
    summary = {}
    for view in rounds_of(arm):
        for stage in round_stages(view.r):
            runner.run_stage(stage, view)
        with open(os.path.join(view.out("preferences"), "manifest.json")) as f:
            row = {"pairs": json.load(f)["num_records"]}
        teacher = [o for _, _, o in view.sets() if os.path.basename(o).startswith("teacher-")]
        if teacher:
            row["critic"] = critic_policy_preferred([c for o in teacher for c in load_comparisons(o)])
        summary[view.r] = row
    with open(os.path.join(arm.world.path("runs", arm.name, "rounds"), "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    return {"output": arm.world.path("runs", arm.name, "rounds"), "rounds": len(summary)}


# -- the plot -------------------------------------------------------------------------------


def plot_rounds(out_dir: str, rows: list, reference: dict) -> None:
    """rounds.png: each iterative arm's win rate (+- SE) and task score by round, round 0
    its SFT policy when that arm is in the table, the one-round DPO arm as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from rlaif_jax.miniature import ITERATIVE_START, RL_START

    by_arm = {r["arm"]: r for r in rows}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, (start, _) in ITERATIVE_START.items():
        rounds = sorted((int(a.rsplit("round", 1)[1]), r) for a, r in by_arm.items() if a.startswith(f"{name}/round"))
        if not rounds:
            continue
        pts = ([(0, by_arm[start])] if start in by_arm else []) + rounds
        xs = [x for x, _ in pts]
        axes[0].errorbar(
            xs,
            [r["win_rate"] for _, r in pts],
            yerr=[r["se"] for _, r in pts],
            marker="o",
            capsize=4,
            label=pts[-1][1]["label"].rsplit(",", 1)[0],
        )
        axes[1].plot(xs, [r["task_score"] for _, r in pts], marker="o")
        one_round = [a for a, (st, _) in RL_START.items() if st == start and a.startswith("dpo_") and a in by_arm]
        for a in one_round:
            axes[0].axhline(by_arm[a]["win_rate"], color="tab:red", ls="--", lw=1, label=by_arm[a]["label"])
            axes[1].axhline(by_arm[a]["task_score"], color="tab:red", ls="--", lw=1)
    axes[1].axhline(reference["task_score"], color="grey", ls=":", lw=1, label="reference")
    axes[0].set_ylabel("win rate vs reference (%)")
    axes[1].set_ylabel("true task score (%)")
    for ax in axes:
        ax.set_xlabel("round (0: the SFT policy)")
        ax.legend(fontsize=8)
    fig.suptitle("Iterative RLAIF in miniature: each round re-samples the policy and asks the critic again")
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "rounds.png"), dpi=120)
    plt.close(fig)
