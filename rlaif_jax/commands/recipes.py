"""List the gin recipes shipped with the package (configs/): each name runs as
`rlaif <command> --gin_file=<name>` from any directory.

  rlaif recipes                 every recipe
  rlaif recipes paper/arms      those under a folder
"""

from __future__ import annotations

import argparse
import os

from rlaif_jax.cli import configs_root
from rlaif_jax.errors import UserError


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("under", nargs="?", default="", help="a folder of configs/, e.g. experiments/paper/arms")
    args = ap.parse_args(argv)
    root = configs_root()
    if root is None:
        raise UserError("no configs/ beside this installation of rlaif_jax; reinstall the package")
    base = os.path.join(root, "configs")
    found = []
    for d, _, files in os.walk(base):
        for f in files:
            rel = os.path.relpath(os.path.join(d, f), base)
            under = args.under.strip("/")
            if f.endswith((".gin", ".yaml")) and (rel.startswith(under) or rel.startswith(f"experiments/{under}")):
                found.append(rel)
    if not found:
        raise UserError(f"no recipe under {os.path.join(base, args.under)}")
    print(f"# {base}")
    print("\n".join(sorted(found)))
    return 0
