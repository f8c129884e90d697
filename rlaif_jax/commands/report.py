"""Results table (markdown + CSV) and plots across evaluation runs:

  rlaif report runs/eval/* --out_dir runs/report

Writes results.md, results.csv, win_rate_bars.png (base model x arm, +- SE),
lc_win_rate_bars.png when runs have LC numbers, and win_rate_vs_sft_fraction.png when
runs carry an sft_fraction label.
"""

from __future__ import annotations

import argparse

from rlaif_jax.eval.report import make_report


def main(argv=None):

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="evaluation run directories (each with metrics.json)")
    ap.add_argument("--out_dir", required=True)
    args = ap.parse_args(argv)
    out = make_report(args.runs, args.out_dir)
    with open(out["md"]) as f:
        print(f.read())
    for k, v in out.items():
        print(f"{k}: {v}")
    return 0
