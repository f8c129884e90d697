"""tools/device_bench.py: the table's arithmetic on given results, and the script run on the
CPU with the tiny preset (the same code that runs on a GPU, at toy shapes)."""

import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "tools", "device_bench.py")


def _module():
    spec = importlib.util.spec_from_file_location("device_bench", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def test_summary_ratio_mfu_and_errors():
    db = _module()
    a = db.parse_args(["--preset", "tiny"])
    env = {"device": "NVIDIA H200", "backend": "gpu"}
    results = {
        "sft": {
            "jax": dict(tokens=1000, seconds=2.0, flops=989e12, peak_bytes=2**31, mem_kind="device", env=env),
            "torch": dict(tokens=1000, seconds=4.0, flops=989e12, peak_bytes=2**30, mem_kind="device", env=env),
        },
        "ppo": {"jax": {"error": "RESOURCE_EXHAUSTED"}, "torch": dict(tokens=10, seconds=1.0, flops=0.0, **_mem())},
    }
    s = db.summarise(a, results)
    assert s["peak_tflops"] == 989.0
    sft, ppo = s["table"]
    assert sft["jax"]["tok_s"] == 500.0 and sft["torch"]["tok_s"] == 250.0 and sft["ratio"] == 2.0
    assert sft["jax"]["mfu"] == pytest.approx(0.5) and sft["torch"]["mfu"] == pytest.approx(0.25)
    assert sft["jax"]["peak_gib"] == 2.0
    assert ppo["jax"] == {"error": "RESOURCE_EXHAUSTED"} and ppo["ratio"] is None


def _mem():
    return dict(peak_bytes=1, mem_kind="host RSS", env={"device": "cpu"})


def test_unknown_row_is_a_usage_error():
    with pytest.raises(SystemExit):
        _module().parse_args(["--rows", "sft,backprop"])


def _run_tiny(tmp_path, *extra):
    pytest.importorskip("torch", reason="the peer columns need torch")
    pytest.importorskip("transformers", reason="the peer columns need transformers")
    out = tmp_path / "bench.json"
    argv = [sys.executable, SCRIPT, "--preset", "tiny", "--dtype", "float32", "--steps", "1", "--warmup", "1"]
    env = dict(os.environ, XLA_FLAGS="", PYTHONPATH=ROOT)
    r = subprocess.run(
        [*argv, "--out", str(out), *extra], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout, json.loads(out.read_text())


def _check(stdout, doc, rows):
    assert [line["row"] for line in doc["table"]] == rows
    for line in doc["table"]:
        for fw in ("jax", "torch"):
            x = line[fw]
            assert "error" not in x, x
            assert math.isfinite(x["tok_s"]) and x["tok_s"] > 0
            assert math.isfinite(x["peak_gib"]) and x["peak_gib"] > 0
            assert x["mfu"] is None  # CPU: no known peak
        assert line["ratio"] > 0
        assert any(t.split()[:1] == [line["row"]] for t in stdout.splitlines())
    assert doc["versions"]["jax"] and doc["env"]["jax"]["backend"] == "cpu"


@pytest.mark.slow  # ~40 s on 2 shared cores: two frameworks' imports, weights, compiles
def test_tiny_forward_in_process(tmp_path):
    stdout, doc = _run_tiny(tmp_path, "--isolate", "none", "--rows", "forward")
    _check(stdout, doc, ["forward"])


@pytest.mark.slow
def test_tiny_every_row_isolated(tmp_path):
    stdout, doc = _run_tiny(tmp_path)
    _check(stdout, doc, ["sft", "dpo", "forward", "generate", "ppo"])
