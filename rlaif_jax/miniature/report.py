"""The miniature's report: each arm's row (win rate against the reference +- SE, the world's
task score), the paper's findings as paired differences on the same eval prompts, the critic's
preference for the SFT policy's sample, results.md / results.csv / results.png (and rounds.png
for the iterative arm), summary.json. With the optional KTO / ORPO / LoRA arms, each one's
gain over SFT weak 10% (paired, beside DPO's) follows the findings; without them the report
is what it always was."""

from __future__ import annotations

import csv
import json
import os
from typing import Sequence

import matplotlib

matplotlib.use("Agg")  # files only: the miniature runs on machines without a display
import matplotlib.pyplot as plt  # noqa: E402

from rlaif_jax import environment, fileio  # noqa: E402
from rlaif_jax.eval.paired import PairedDifference, paired_difference  # noqa: E402
from rlaif_jax.miniature.campaign import ITERATIVE_START, LABELS, OPTIONAL_START, RL_START  # noqa: E402
from rlaif_jax.synthetic import findings as F  # noqa: E402

GAIN_BASE = "sft_weak_10"


def gains(per_prompt: dict) -> list[tuple[str, PairedDifference, PairedDifference]]:
    """(arm, win-rate gain, task-score gain) over SFT weak 10%, paired on the eval prompts
    (points), of each optional one-round arm that ran, DPO's first for comparison; empty
    when no optional arm ran (the default report stays as it was)."""
    optional = [a for a in OPTIONAL_START if a in per_prompt]
    if GAIN_BASE not in per_prompt or not optional:
        return []
    arms = (["dpo_weak_10"] if "dpo_weak_10" in per_prompt else []) + optional
    b = per_prompt[GAIN_BASE]
    return [
        (a, paired_difference(per_prompt[a]["win"], b["win"]), paired_difference(per_prompt[a]["task"], b["task"]))
        for a in arms
    ]


def gains_markdown(found: list) -> str:
    lines = [
        f"Other objectives on the same SFT policy: gain over {LABELS[GAIN_BASE]}, paired on the same eval prompts "
        "(points, +- SE):",
        "",
        "| arm | win rate | task score | n |",
        "|---|---|---|---|",
    ]
    for arm, w, t in found:
        lines.append(f"| {LABELS[arm]} | {w.diff:+.1f} +- {w.se:.1f} | {t.diff:+.1f} +- {t.se:.1f} | {w.n} |")
    return "\n".join(lines)


def critic_policy_preferred(comparisons: Sequence[dict]) -> dict:
    """How often the critic preferred the policy sample (response_1) over the teacher's
    completion, over decided verdicts: the paper's "GPT-4 preferred the SFT sample 14.3%"."""
    decided = [c["verdict"] for c in comparisons if c["verdict"] in ("first", "second")]
    return {
        "policy_preferred": 100 * sum(v == "first" for v in decided) / max(len(decided), 1),
        "decided": len(decided),
        "judged": len(comparisons),
    }


def write_summary(out_dir: str, rows: list, found: list, critic: dict, env: dict, gained: list = ()) -> dict:
    """One flat summary per miniature, so sweeps (rlaif_jax.sweep) can tabulate runs;
    gain/<arm>/{win,task}_{diff,se} for the optional arms' gains."""
    summary = {f"{r['arm']}/{k}": r[k] for r in rows for k in ("win_rate", "se", "task_score", "task_exact")}
    summary.update(F.flatten(found))
    for arm, w, t in gained:
        for name, d in (("win", w), ("task", t)):
            summary[f"gain/{arm}/{name}_diff"] = d.diff
            summary[f"gain/{arm}/{name}_se"] = d.se
    summary.update({f"critic/{start}/policy_preferred": c["policy_preferred"] for start, c in critic.items()})
    summary["environment"] = env
    with fileio.atomic_write(os.path.join(out_dir, "summary.json")) as f:
        json.dump(summary, f, indent=2)
    return summary


def write_report(
    out_dir: str, rows: list, reference: dict, found: list, critic: dict, env: dict, gained: list = ()
) -> None:
    cols = ["label", "win_rate", "se", "task_score", "task_exact", "wins", "losses", "ties", "invalid", "n"]
    with fileio.atomic_write(os.path.join(out_dir, "results.csv")) as f:
        w = csv.DictWriter(f, fieldnames=["arm"] + cols)
        w.writeheader()
        w.writerows([{k: r[k] for k in ["arm"] + cols} for r in rows])
    lines = [
        "| arm | win rate vs reference (%) | task score (%) | exact (%) | W / L / T / invalid |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['label']} | {r['win_rate']:.1f} +- {r['se']:.1f} | {r['task_score']:.1f} | "
            f"{r['task_exact']:.1f} | {r['wins']} / {r['losses']} / {r['ties']} / {r['invalid']} |"
        )
    lines.append(f"\nReference model: task score {reference['task_score']:.1f}%, exact {reference['task_exact']:.1f}%.")
    for start, c in critic.items():
        lines.append(
            f"Critic preferred the {LABELS[start]} policy's sample over its teacher's completion "
            f"{c['policy_preferred']:.1f}% of {c['decided']} decided pairs (paper, GPT-4 critic on "
            "Llama-7B SFT vs ChatGPT: 14.3%)."
        )
    if found:
        lines += ["", F.markdown(found)]
    if gained:
        lines += ["", gains_markdown(gained)]
    lines += ["", f"Computed with {environment.one_line(env)}."]
    with fileio.atomic_write(os.path.join(out_dir, "results.md")) as f:
        f.write("\n".join(lines) + "\n")

    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    labels = [r["label"] for r in rows]
    axes[0].bar(
        range(len(rows)), [r["win_rate"] for r in rows], yerr=[r["se"] for r in rows], capsize=4, color="tab:blue"
    )
    axes[0].axhline(50, color="grey", lw=0.8, ls="--")
    axes[0].set_ylabel("win rate vs reference (%)")
    axes[1].bar(range(len(rows)), [r["task_score"] for r in rows], color="tab:green")
    axes[1].axhline(reference["task_score"], color="grey", lw=0.8, ls="--", label="reference")
    axes[1].set_ylabel("true task score (%)")
    axes[1].legend()
    for ax in axes:
        ax.set_xticks(range(len(rows)))
        ax.set_xticklabels(labels, rotation=25, ha="right", fontsize=8)
    fig.suptitle("RLAIF in miniature: win rate judged by the AI judge, and true task score")
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "results.png"), dpi=120)
    plt.close(fig)
    if any("/round" in r["arm"] for r in rows):
        plot_rounds(out_dir, rows, reference)


def plot_rounds(out_dir: str, rows: list, reference: dict) -> None:
    """rounds.png: each iterative arm's win rate (+- SE) and task score by round, round 0
    its SFT policy when that arm is in the table, the one-round DPO arm as a dashed line."""
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
