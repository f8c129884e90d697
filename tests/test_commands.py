"""The installed `rlaif` command: its table, `rlaif --help`, packaged recipes by name, and
`rlaif train` on the tiny recipe from a directory outside the clone, as a user of the
installed package runs it."""

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from rlaif_jax import cli
from rlaif_jax.commands import COMMANDS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def rlaif_argv() -> list[str]:
    """The installed console script of this interpreter's environment (CI installs it), else
    `python -m rlaif_jax`, the same code path (an editable install made before [project.scripts]
    has no script)."""
    here = os.path.join(os.path.dirname(sys.executable), "rlaif")
    if os.path.isfile(here):
        return [here]
    found = shutil.which("rlaif")
    if found and os.path.dirname(os.path.realpath(found)) == os.path.dirname(os.path.realpath(sys.executable)):
        return [found]
    return [sys.executable, "-m", "rlaif_jax"]


def test_help_lists_every_command_without_importing_jax():
    r = subprocess.run(rlaif_argv() + ["--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    listed = re.findall(r"^  (\S+)\s{2,}\S", r.stdout, flags=re.M)
    assert listed == list(COMMANDS)
    probe = "import sys, rlaif_jax.commands; print(sorted(m for m in ('jax', 'gin', 'numpy') if m in sys.modules))"
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert r.stdout.strip() == "[]", r.stdout + r.stderr


def test_every_command_names_a_main():
    for name, (target, line) in COMMANDS.items():
        module, _, fn = target.partition(":")
        spec = importlib.util.find_spec(module)
        assert spec is not None and spec.origin, f"{name}: no module {module}"
        with open(spec.origin) as f:
            assert re.search(rf"^def {fn}\(argv\b", f.read(), flags=re.M), f"{name}: {target} has no {fn}(argv)"
        assert line and "\n" not in line


def test_unknown_command_is_one_line(capsys):
    from rlaif_jax.commands import main

    assert main(["trian"]) == 2
    assert (
        capsys.readouterr().err.strip()
        == "error: no command 'trian' (did you mean `rlaif train`?); `rlaif --help` lists them"
    )


def test_packaged_recipes_resolve_by_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # outside the clone: nothing under ./configs
    want = os.path.join(ROOT, "configs", "experiments", "tiny_sft.gin")
    for given in ("tiny_sft", "tiny_sft.gin", "experiments/tiny_sft", "configs/experiments/tiny_sft.gin"):
        assert os.path.samefile(cli.resolve_gin_file(given), want), given
    arm = cli.resolve_gin_file("paper/arms/dpo_gpt4_on_sft_gpt35_10pct")
    assert arm.endswith(os.path.join("configs", "experiments", "paper", "arms", "dpo_gpt4_on_sft_gpt35_10pct.gin"))
    assert cli.resolve_gin_file("no_such_recipe") == "no_such_recipe"
    (tmp_path / "tiny_sft.gin").write_text("# mine\n")
    assert cli.resolve_gin_file("tiny_sft.gin") == "tiny_sft.gin"  # a file on disk wins


def test_a_missing_recipe_is_one_line(tmp_path, monkeypatch):
    import argparse

    from rlaif_jax.errors import ConfigError

    monkeypatch.chdir(tmp_path)
    args = argparse.Namespace(gin_file=["no_such_recipe"], gin_param=[], gin_search_path=[], log_level="WARNING")
    with pytest.raises(ConfigError, match=r"--gin_file=no_such_recipe: no such file, nor a recipe of that name"):
        cli.parse_gin(args)


def test_train_on_the_tiny_recipe_outside_the_clone(tmp_path):
    """`rlaif toy-data` then `rlaif train --gin_file=tiny_sft` in an empty directory: the recipe,
    its includes and the run directory resolve without a clone as the working directory."""
    env = dict(os.environ, XLA_FLAGS="")
    rlaif = rlaif_argv()
    r = subprocess.run(
        rlaif + ["toy-data", "runs/toy"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, r.stderr[-2000:]
    r = subprocess.run(
        rlaif
        + [
            "train",
            "--gin_file=tiny_sft",
            "--gin_param=train.num_steps=1",
            "--gin_param=train.eval_every=0",
            "--gin_param=train.sample_prompts=[]",
            "--gin_param=LoopSettings.export_hf=False",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Path not found" not in r.stderr  # no search of a ./configs the directory does not have
    run = tmp_path / "runs" / "tiny_sft"
    assert json.loads((run / "summary.json").read_text())["step"] == 1
    assert "train.num_steps = 1" in (run / "operative_config.gin").read_text()


@pytest.mark.slow
def test_wheel_ships_the_recipes_and_the_command(tmp_path):
    """A wheel built from the tracked files holds configs/ as rlaif_jax/configs and the `rlaif`
    console script (about 15 s: a copy of the tree and a setuptools build)."""
    import zipfile

    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    src = tmp_path / "src"
    for f in files:
        if os.path.isfile(os.path.join(ROOT, f)):
            os.makedirs(src / os.path.dirname(f), exist_ok=True)
            shutil.copy2(os.path.join(ROOT, f), src / f)
    r = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"), "."],
        cwd=src,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    configs = {n for n in files if n.startswith("configs/") and n.endswith((".gin", ".yaml"))}
    assert {"rlaif_jax/" + n for n in configs} <= set(names)
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    assert "rlaif = rlaif_jax.commands:main" in zipfile.ZipFile(wheel).read(entry).decode()
