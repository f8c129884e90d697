"""Expand a sweep file (gin experiment + grid of bindings) into runs; run the unfinished
ones locally in sequence, or print their commands (plain or for tpu/run.sh); then
aggregate every run's summary into results.csv / results.md under the sweep's run_root.

  rlaif sweep configs/sweeps/tiny_dpo_beta.yaml            # run locally
  rlaif sweep configs/sweeps/tiny_dpo_beta.yaml --print    # commands only
  rlaif sweep configs/sweeps/tiny_dpo_beta.yaml --tpu      # tpu/run.sh commands
  rlaif sweep configs/sweeps/tiny_dpo_beta.yaml --aggregate
"""

import argparse
import shlex
import sys

from rlaif_jax.sweep import aggregate, expand, load_sweep, run_locally, tpu_commands


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sweep_file")
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--print", action="store_true", help="print the commands of unfinished runs")
    mode.add_argument("--tpu", action="store_true", help="print tpu/run.sh commands for unfinished runs")
    mode.add_argument("--aggregate", action="store_true", help="only aggregate finished runs")
    ap.add_argument("--metrics", nargs="*", help="summary keys for the table (default: the sweep's, else all)")
    args = ap.parse_args(argv)

    spec = load_sweep(args.sweep_file)
    runs = expand(spec)
    if args.print:
        for r in runs:
            print(("# finished: " if r.finished else "") + shlex.join(r.command))
        return 0
    if args.tpu:
        print("\n".join(tpu_commands(runs)))
        return 0
    status = {} if args.aggregate else run_locally(runs)
    rows = aggregate(spec, runs, args.metrics)
    print(open(f"{spec['run_root']}/results.md").read())
    failed = [k for k, v in status.items() if v.startswith("failed")]
    if failed:
        print(f"{len(failed)} run(s) failed: {failed}", file=sys.stderr)
        return 1
    return 0 if rows else 1
