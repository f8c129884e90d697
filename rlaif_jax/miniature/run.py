"""Runs (or resumes) the miniature: the world, then each arm of the campaign through the
pipeline's runner and stages (rlaif_jax.pipeline.run_arm), then the report."""

from __future__ import annotations

import os
from typing import Optional

from rlaif_jax import environment
from rlaif_jax.feedback.server import ServerThread, make_app
from rlaif_jax.feedback.stages import load_comparisons
from rlaif_jax.iterative import IterativeSettings
from rlaif_jax.miniature import campaign as C
from rlaif_jax.miniature import report
from rlaif_jax.miniature.world import World, claim_shared, evaluation_row, make_world, reference_accuracy
from rlaif_jax.pipeline import run_arm
from rlaif_jax.pipeline.arm import layout
from rlaif_jax.synthetic import findings as F
from rlaif_jax.synthetic.backend import synthetic_world


def run_miniature(settings: Optional[C.MiniatureSettings] = None) -> list:
    """Runs (or resumes) the miniature `settings` describe (None: gin's `run_miniature.*`);
    returns the result rows (also results.md / results.csv / summary.json in out_dir)."""
    s = settings if settings is not None else C.MiniatureSettings()
    # Before anything is made; every arm binds the same keys (run_miniature.arms may be empty).
    C.check_no_user_binding(C.bindings(s, None, C.ARMS[0]))
    os.makedirs(s.out_dir, exist_ok=True)
    world_models = synthetic_world()
    claim_shared(
        s.shared_dir,
        {
            "seed": s.seed,
            "num_prompts": s.num_prompts,
            "num_eval": s.num_eval,
            "num_pretrain": s.num_pretrain,
            "hidden_size": s.hidden_size,
            "num_layers": s.num_layers,
            "pretrain_epochs": s.pretrain_epochs,
            "pretrain_lr": s.pretrain_lr,
            "batch_size": s.batch_size,
            "web_quality": world_models.models["web"].strength,
        },
    )
    if s.iterative is None and set(s.arms) & set(C.ITERATIVE_START):
        s = C.dataclasses.replace(s, iterative=IterativeSettings())  # gin's bindings, built once here
    with ServerThread(make_app(world_models)) as srv:
        world = make_world(
            s.out_dir,
            s.shared_dir,
            srv.url,
            seed=s.seed,
            num_prompts=s.num_prompts,
            num_eval=s.num_eval,
            num_pretrain=s.num_pretrain,
            sft_fraction=s.sft_fraction,
            hidden_size=s.hidden_size,
            num_layers=s.num_layers,
            pretrain_epochs=s.pretrain_epochs,
            pretrain_lr=s.pretrain_lr,
            batch_size=s.batch_size,
            progress=s.progress,
        )
        arms = {name: C.arm_settings(s, world, name) for name in s.arms}
        for name in s.run_order():
            with C.bound(C.bindings(s, world, name)):
                run_arm(arms[name])
        rows, per_prompt = [], {}
        for name in s.arms:
            for arm, label, out in _evaluations(s, world, name, arms[name]):
                row, per_prompt[arm] = evaluation_row(out)
                rows.append({"arm": arm, "label": label, **row})
        critic = {}
        for start in sorted({C.RL_START[a][0] for a in s.arms if a in C.RL_START}):
            first = next(a for a in s.arms if C.RL_START.get(a, ("",))[0] == start)
            view = layout(arms[first]).round(1)
            comps = [c for k in range(s.feedback_samples) for c in load_comparisons(view.teacher_comparisons(k))]
            critic[start] = report.critic_policy_preferred(comps)
    found = F.findings(per_prompt)
    gains = report.gains(per_prompt)
    env = environment.describe()
    report.write_report(s.out_dir, rows, reference_accuracy(world), found, critic, env, gains)
    report.write_summary(s.out_dir, rows, found, critic, env, gains)
    return rows


def _evaluations(s: C.MiniatureSettings, world: World, name: str, settings) -> list[tuple[str, str, str]]:
    """(row name, label, evaluation directory) of what an arm adds to the table: itself, or
    each round of an iterative arm (the last round evaluated by the arm's evaluate stage)."""
    if name not in C.ITERATIVE_START:
        return [(name, C.LABELS[name], C.eval_dir(world, name))]
    rounds = settings.iterative.rounds
    arm = layout(settings)
    out = []
    for r in range(1, rounds + 1):
        where = C.eval_dir(world, name) if r == rounds else arm.round(r).out("evaluate")
        out.append((f"{name}/round{r}", f"{C.LABELS[name]}, round {r}", where))
    return out
