"""Sweeps: a gin experiment plus a grid of bindings, expanded into runs.

A sweep file (YAML):

    name: tiny_dpo_beta
    gin_files: [configs/experiments/tiny_dpo.gin]
    run_dir_param: train.run_dir        # the binding that receives each run's directory
    run_root: runs/sweeps/tiny_dpo_beta
    command: train                      # the `rlaif` subcommand each run is (default train;
                                        # arm, ppo, miniature, ...); or script: a .py file to run
    fixed: {train.num_steps: 20}        # bindings for every run
    grid:                               # the cartesian product of these
      DPO.beta: [0.1, 0.5]
      DPO.loss_type: [sigmoid, ipo]

Values are Python literals written into gin with repr() (strings get their quotes). A grid
key `gin_file` or `gin_file.<axis>` (e.g. gin_file.model, gin_file.arm) varies whole gin
files instead: each value is a file (or a list of files) added after `gin_files`, and named
in the run's directory by its base name.
A run whose directory holds summary.json is finished and skipped.
"""

from __future__ import annotations

import csv
import dataclasses
import itertools
import os
import re
import shlex
import subprocess
import sys
from typing import Any, Optional

import yaml

from rlaif_jax import fileio

SUMMARY = "summary.json"


@dataclasses.dataclass(frozen=True)
class Run:
    name: str
    run_dir: str
    point: dict  # grid binding -> value
    command: tuple

    @property
    def finished(self) -> bool:
        return fileio.exists(fileio.join(self.run_dir, SUMMARY))


def _gin_value(v: Any) -> str:
    if isinstance(v, (str, int, float, bool, list, tuple)) or v is None:
        return repr(v)
    raise ValueError(f"sweep values must be Python literals, got {v!r}")


def _is_file_axis(key: str) -> bool:
    return key == "gin_file" or key.startswith("gin_file.")


def _files(value: Any) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _slug(point: dict) -> str:
    parts = []
    for k, v in point.items():
        key = k.split(".")[-1]
        if _is_file_axis(k):
            v = "+".join(os.path.splitext(os.path.basename(f))[0] for f in _files(v))
        val = re.sub(r"[^A-Za-z0-9._+-]+", "-", str(v)).strip("-")
        parts.append(f"{key}={val}")
    return ",".join(parts) or "base"


def load_sweep(path: str) -> dict:
    try:
        with open(path) as f:
            spec = yaml.safe_load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"sweep file {path} does not exist") from None
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(spec, dict):
        raise ValueError(f"{path}: a sweep file is a mapping")
    known = {"name", "gin_files", "run_dir_param", "run_root", "command", "script", "fixed", "grid", "metrics"}
    unknown = set(spec) - known
    if unknown:
        raise ValueError(f"{path}: unknown sweep keys {sorted(unknown)}; known: {sorted(known)}")
    for key in ("gin_files", "run_dir_param", "run_root"):
        if key not in spec:
            raise ValueError(f"{path}: missing {key!r}")
    grid = spec.get("grid") or {}
    for k, vals in grid.items():
        if not isinstance(vals, list) or not vals:
            raise ValueError(f"{path}: grid entry {k!r} must be a non-empty list")
    return spec


def _launcher(spec: dict, python: str) -> list[str]:
    """The head of each run's command: `python -m rlaif_jax <command>` (works wherever the
    package is installed), or a script file the spec names."""
    if "command" in spec and "script" in spec:
        raise ValueError(f"sweep {spec.get('name', '')!r}: give `command` (an rlaif subcommand) or `script`, not both")
    if "script" in spec:
        return [python, spec["script"]]
    return [python, "-m", "rlaif_jax", str(spec.get("command", "train"))]


def expand(spec: dict, python: str = sys.executable) -> list[Run]:
    grid = spec.get("grid") or {}
    keys = list(grid)
    runs = []
    for values in itertools.product(*(grid[k] for k in keys)):
        point = dict(zip(keys, values))
        name = _slug(point)
        run_dir = fileio.join(spec["run_root"], name)
        cmd = _launcher(spec, python)
        cmd += [f"--gin_file={g}" for g in spec["gin_files"]]
        cmd += [f"--gin_file={g}" for k, v in point.items() if _is_file_axis(k) for g in _files(v)]
        params = {k: v for k, v in point.items() if not _is_file_axis(k)}
        bindings = {**(spec.get("fixed") or {}), **params, spec["run_dir_param"]: run_dir}
        cmd += [f"--gin_param={k}={_gin_value(v)}" for k, v in bindings.items()]
        runs.append(Run(name, run_dir, point, tuple(cmd)))
    return runs


def run_locally(runs: list[Run], log=print) -> dict:
    """Runs unfinished runs in sequence; a failure is recorded and the sweep goes on."""
    status = {}
    for r in runs:
        if r.finished:
            status[r.name] = "skipped (finished)"
            continue
        # The run's console log beside it; for a gs:// run_root, in ./sweep_logs here.
        log_dir = os.path.join("sweep_logs", r.name) if fileio.is_url(r.run_dir) else r.run_dir
        os.makedirs(log_dir, exist_ok=True)
        log_path = os.path.join(log_dir, "sweep.log")
        log(f"[{r.name}] {shlex.join(r.command)}")
        with open(log_path, "a") as f:
            rc = subprocess.call(list(r.command), stdout=f, stderr=subprocess.STDOUT)
        status[r.name] = "ok" if rc == 0 and r.finished else f"failed (exit {rc}, see {log_path})"
        log(f"[{r.name}] {status[r.name]}")
    return status


def tpu_commands(runs: list[Run]) -> list[str]:
    """The commands to launch each unfinished run on a TPU slice with tpu/run.sh: on the
    workers, the venv's `rlaif` (tpu/setup.sh installs it), or its `python` for a script."""
    out = []
    for r in runs:
        if r.finished:
            continue
        head = ["rlaif"] if r.command[1:3] == ("-m", "rlaif_jax") else ["python"]
        rest = r.command[3:] if head == ["rlaif"] else r.command[1:]
        out.append(shlex.join(["tpu/run.sh", *head, *rest]))
    return out


def aggregate(spec: dict, runs: list[Run], metrics: Optional[list] = None) -> list[dict]:
    """One row per run: its grid point and chosen metrics from summary.json (plus any
    evaluation metrics in eval/metrics.json); written as results.csv and results.md."""
    rows = []
    for r in runs:
        row = {
            "run": r.name,
            **{
                k: "+".join(os.path.splitext(os.path.basename(f))[0] for f in _files(v)) if _is_file_axis(k) else v
                for k, v in r.point.items()
            },
        }
        if r.finished:
            summary = fileio.read_json(fileio.join(r.run_dir, SUMMARY))
            ev = fileio.join(r.run_dir, "eval", "metrics.json")
            if fileio.exists(ev):
                summary.update({f"eval/{k}": v for k, v in fileio.read_json(ev).items()})
            keys = (
                metrics or spec.get("metrics") or sorted(k for k, v in summary.items() if isinstance(v, (int, float)))
            )
            row.update({k: summary.get(k) for k in keys})
            row["status"] = "finished"
        else:
            row["status"] = "not finished"
        rows.append(row)
    cols = list(dict.fromkeys(k for row in rows for k in row))
    fileio.makedirs(spec["run_root"])
    with fileio.atomic_write(fileio.join(spec["run_root"], "results.csv"), "w") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)

    def fmt(v):
        return f"{v:.4g}" if isinstance(v, float) else ("" if v is None else str(v))

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(row.get(c)) for c in cols) + " |" for row in rows]
    with fileio.atomic_write(fileio.join(spec["run_root"], "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return rows
