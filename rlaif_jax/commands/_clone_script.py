"""Load a script that still lives in a clone's scripts/ (scripts/run_arm.py and
scripts/miniature.py, which the pipeline branch is moving into the package).

TODO(lead, at merge): once `rlaif arm` and `rlaif miniature` point at
rlaif_jax.pipeline.command:main and rlaif_jax.miniature.command:main in
rlaif_jax/commands/__init__.py, delete this module with commands/arm.py and commands/miniature.py.
"""

from __future__ import annotations

import importlib.util
import os

from rlaif_jax.errors import UserError

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def script_main(name: str):
    """`main` of scripts/<name>.py in the clone this package was imported from."""
    path = os.path.join(_REPO, "scripts", f"{name}.py")
    if not os.path.isfile(path):
        raise UserError(f"{path}: not found; this command runs from a clone (pip install -e .) for now")
    spec = importlib.util.spec_from_file_location(f"_rlaif_script_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.main
