"""Reports across evaluation runs: one results table (markdown + CSV) and the paper's
kinds of figures (matplotlib, Agg backend, PNG): grouped bars of win rate +- SE per base
model and arm, and win rate against the fraction of SFT data.

A run is a directory written by scripts/evaluate.py holding metrics.json; its labels
(base_model, arm, sft_fraction, judge, protocol) come from the run's `labels`."""

from __future__ import annotations

import csv
import json
import math
import os
from typing import Iterable, Optional, Sequence

import numpy as np

from rlaif_jax.eval.length_control import estimate_instruction_difficulty, length_controlled_win_rate
from rlaif_jax.winrate import preferences_from_verdicts

COLUMNS = (
    "run",
    "base_model",
    "arm",
    "sft_fraction",
    "protocol",
    "judge",
    "win_rate",
    "standard_error",
    "lc_win_rate",
    "lc_method",
    "lc_bootstrap_standard_error",
    "lc_prediction_standard_error",
    "lc_joint_win_rate",
    "n_wins",
    "n_losses",
    "n_ties",
    "n_invalid",
    "n_total",
    "continuous_win_rate",
    "mean_reward",
    "avg_length",
    "cost_usd_total",
)


def load_run(run_dir: str) -> dict:
    path = os.path.join(run_dir, "metrics.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{run_dir}: no metrics.json (not an evaluation run directory?)")
    with open(path) as f:
        m = json.load(f)
    if "lc_standard_error" in m:  # metrics.json from before the SE fields were named for what they are
        m.setdefault("lc_bootstrap_standard_error", m["lc_standard_error"])
    row = {"run": m.get("labels", {}).get("run") or os.path.basename(os.path.normpath(run_dir))}
    row.update({k: v for k, v in m.get("labels", {}).items() if k in COLUMNS})
    row.update({k: m[k] for k in COLUMNS if k in m and k not in row})
    return row


def collect(run_dirs: Iterable[str]) -> list[dict]:
    return [load_run(d) for d in run_dirs]


def _judgments(run_dir: str) -> list[dict]:
    path = os.path.join(run_dir, "judgments.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return rows if rows and "verdict" in rows[0] else []  # reward-model runs have no verdicts


def joint_length_control(run_dirs: Sequence[str], l2_difficulty: float = 1.0) -> dict[str, float]:
    """LC win rates with the instruction-difficulty term estimated jointly across the judge
    runs given (AlpacaEval 2's approach, over our runs instead of its leaderboard):
    {run_dir: lc_joint_win_rate}. Needs >= 2 judge runs; instructions are matched by
    prompt_id, and each must have one reference output across runs."""

    runs = {d: _judgments(d) for d in run_dirs}
    runs = {d: j for d, j in runs.items() if j}
    if len(runs) < 2:
        return {}
    ids = sorted({r["prompt_id"] for j in runs.values() for r in j})
    col = {pid: i for i, pid in enumerate(ids)}
    ref_len = np.full(len(ids), np.nan)
    P = np.full((len(runs), len(ids)), np.nan)
    L = np.full((len(runs), len(ids)), np.nan)
    for i, j in enumerate(runs.values()):
        prefs = preferences_from_verdicts([r["verdict"] for r in j])
        for r, p in zip(j, prefs):
            c = col[r["prompt_id"]]
            n_ref = len(r["response_2"])
            if not np.isnan(ref_len[c]) and ref_len[c] != n_ref:
                raise ValueError(f"instruction {r['prompt_id']}: runs judged against different references")
            ref_len[c], P[i, c], L[i, c] = n_ref, p, len(r["response_1"])
    # An instruction a run did not judge is missing (NaN preference), as an invalid one is.
    L = np.where(np.isnan(L), np.nan_to_num(ref_len)[None, :], L)
    gamma = estimate_instruction_difficulty(P, L, np.nan_to_num(ref_len), l2_difficulty=l2_difficulty)
    return {
        d: length_controlled_win_rate(P[i], L[i], np.nan_to_num(ref_len), difficulty=gamma)["lc_win_rate"]
        for i, d in enumerate(runs)
    }


def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 1 and v != 0 else f"{v:.2f}"
    return str(v)


def write_table(
    rows: Sequence[dict], out_md: Optional[str] = None, out_csv: Optional[str] = None, columns: Sequence[str] = COLUMNS
) -> str:
    """Markdown text of the table (columns no row has are left out); also written to the
    given paths."""
    cols = [c for c in columns if any(r.get(c) not in (None, "") for r in rows)]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = []
        for c in cols:
            if c == "win_rate" and r.get("standard_error") is not None:
                cells.append(f"{_fmt(r.get(c))} ± {_fmt(r['standard_error'])}")
            else:
                cells.append(_fmt(r.get(c)))
        lines.append("| " + " | ".join(cells) + " |")
    md = "\n".join(lines) + "\n"
    if out_md:
        with open(out_md, "w") as f:
            f.write(md)
    if out_csv:
        with open(out_csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(cols), extrasaction="ignore")
            w.writeheader()
            for r in rows:
                w.writerow({c: r.get(c) for c in cols})
    return md


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_grouped_bars(
    rows: Sequence[dict],
    path: str,
    group: str = "base_model",
    series: str = "arm",
    value: str = "win_rate",
    error: str = "standard_error",
    title: Optional[str] = None,
) -> None:
    """One group of bars per `group` value, one bar per `series` value, error bars +- SE
    (the paper's main figure: base models x arms)."""
    plt = _plt()

    groups = list(dict.fromkeys(str(r.get(group)) for r in rows))
    series_vals = list(dict.fromkeys(str(r.get(series)) for r in rows))
    table = {(str(r.get(group)), str(r.get(series))): r for r in rows}
    width = 0.8 / max(1, len(series_vals))
    x = np.arange(len(groups))
    fig, ax = plt.subplots(figsize=(min(16.0, max(6.0, 0.3 * len(groups) * len(series_vals) + 4)), 4.5))
    for i, s in enumerate(series_vals):
        ys = [table.get((g, s), {}).get(value) for g in groups]
        es = [table.get((g, s), {}).get(error) for g in groups]
        ys = [np.nan if y is None else y for y in ys]
        es = [0.0 if e is None or (isinstance(e, float) and math.isnan(e)) else e for e in es]
        ax.bar(x + (i - (len(series_vals) - 1) / 2) * width, ys, width, yerr=es, capsize=3, label=s)
    ax.set_xticks(x)
    ax.set_xticklabels(groups, rotation=15)
    ax.set_ylabel(f"{value.replace('_', ' ')} (%)")
    ax.axhline(50, color="k", lw=0.6, ls=":")
    ax.legend(fontsize=8, title=series, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.set_title(title or f"{value.replace('_', ' ')} by {group} and {series}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_vs_sft_fraction(
    rows: Sequence[dict],
    path: str,
    line: str = "base_model",
    value: str = "win_rate",
    error: str = "standard_error",
    title: Optional[str] = None,
) -> None:
    """Win rate against the SFT data fraction (rows with an sft_fraction), one line per
    `line` value, shaded +- SE (the paper's data-scaling figure)."""
    plt = _plt()
    pts = [r for r in rows if r.get("sft_fraction") not in (None, "")]
    if not pts:
        raise ValueError("no run has an sft_fraction label")
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for name in dict.fromkeys(str(r.get(line)) for r in pts):
        sel = sorted((r for r in pts if str(r.get(line)) == name), key=lambda r: float(r["sft_fraction"]))
        xs = [100 * float(r["sft_fraction"]) for r in sel]
        ys = [r.get(value) for r in sel]
        es = [r.get(error) or 0.0 for r in sel]
        ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=name)
    ax.set_xlabel("SFT data (% of the SFT split)")
    ax.set_ylabel(f"{value.replace('_', ' ')} (%)")
    ax.legend(fontsize=8)
    ax.set_title(title or f"{value.replace('_', ' ')} vs SFT data")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def make_report(run_dirs: Sequence[str], out_dir: str) -> dict:
    """results.md, results.csv, win_rate_bars.png, and win_rate_vs_sft_fraction.png (when
    runs carry sft_fraction labels); with two or more judge runs, an lc_joint_win_rate column
    (difficulty estimated across them). Returns the paths written."""
    os.makedirs(out_dir, exist_ok=True)
    rows = collect(run_dirs)
    joint = joint_length_control(run_dirs)
    for d, r in zip(run_dirs, rows):
        if d in joint:
            r["lc_joint_win_rate"] = joint[d]
    out = {
        "md": os.path.join(out_dir, "results.md"),
        "csv": os.path.join(out_dir, "results.csv"),
        "bars": os.path.join(out_dir, "win_rate_bars.png"),
    }
    write_table(rows, out["md"], out["csv"])
    plot_grouped_bars(rows, out["bars"])
    if any(r.get("lc_win_rate") is not None for r in rows):
        out["lc_bars"] = os.path.join(out_dir, "lc_win_rate_bars.png")
        # only the bootstrap SE is an uncertainty of the LC win rate; alpaca_eval's
        # prediction spread is not, so alpaca_eval-mode runs get no error bar
        plot_grouped_bars(rows, out["lc_bars"], value="lc_win_rate", error="lc_bootstrap_standard_error")
    if any(r.get("sft_fraction") not in (None, "") for r in rows):
        out["scaling"] = os.path.join(out_dir, "win_rate_vs_sft_fraction.png")
        plot_vs_sft_fraction(rows, out["scaling"])
    return out
