#!/usr/bin/env python
"""Plot the miniature's RL gain against the teacher-critic gap from a finished
configs/sweeps/miniature_gap.yaml sweep: DPO's paired gain over SFT(weak 10%) (+- SE) on the
judge's win rate and on the true task score, against the weak teacher's strength, one line
per critic strength. Writes RUN_ROOT/gap.png and RUN_ROOT/gap.md.

  python tools/plot_miniature_gap.py runs/sweeps/miniature_gap
"""

import argparse
import csv
import os
import sys

from rlaif_jax.cli import run

TEACHER, CRITIC = "synthetic_world.weak_teacher", "synthetic_world.critic_strength"


def load(run_root: str) -> list[dict]:
    path = os.path.join(run_root, "results.csv")
    if not os.path.exists(path):
        raise SystemExit(f"{path} does not exist: run `rlaif sweep configs/sweeps/miniature_gap.yaml` first")
    with open(path) as f:
        rows = [r for r in csv.DictReader(f) if r.get("status") == "finished"]
    if not rows or TEACHER not in rows[0] or CRITIC not in rows[0]:
        raise SystemExit(f"{path}: no finished runs with columns {TEACHER} and {CRITIC}")
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_root")
    args = ap.parse_args(argv)
    rows = load(args.run_root)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    critics = sorted({float(r[CRITIC]) for r in rows})
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    lines = [
        "| weak teacher | critic strength | DPO gain, win rate (points) | DPO gain, task score (points) |",
        "|---|---|---|---|",
    ]
    for c in critics:
        pts = sorted((float(r[TEACHER]), r) for r in rows if float(r[CRITIC]) == c)
        xs = [x for x, _ in pts]
        for ax, key in zip(axes, ("win", "task")):
            ax.errorbar(
                xs,
                [float(r[f"finding/1/{key}_diff"]) for _, r in pts],
                yerr=[float(r[f"finding/1/{key}_se"]) for _, r in pts],
                marker="o",
                capsize=3,
                label=f"critic strength {c:g}",
            )
        for x, r in pts:
            lines.append(
                f"| {x:g} | {c:g} | {float(r['finding/1/win_diff']):+.1f} +- {float(r['finding/1/win_se']):.1f} | "
                f"{float(r['finding/1/task_diff']):+.1f} +- {float(r['finding/1/task_se']):.1f} |"
            )
    for ax, what in zip(axes, ("win rate vs reference (judge)", "true task score")):
        ax.axhline(0, color="grey", lw=0.8, ls="--")
        ax.set_xlabel("weak (SFT) teacher strength")
        ax.set_ylabel(f"DPO gain over SFT, {what} (points)")
        ax.legend(fontsize=8)
    fig.suptitle("RLAIF in miniature: DPO's gain over SFT against SFT-teacher and critic strength")
    fig.tight_layout()
    png = os.path.join(args.run_root, "gap.png")
    fig.savefig(png, dpi=120)
    with open(os.path.join(args.run_root, "gap.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"plot: {png}")
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
