"""The model scripts as a user runs them: write a tiny HF checkpoint, then sample from it."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _run(*args):
    env = dict(os.environ, XLA_FLAGS="")  # one device, as on a laptop
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_tiny_checkpoint_then_sample(tmp_path):
    ck = tmp_path / "tiny"
    r = _run("tools/make_tiny_checkpoint.py", str(ck), "--family", "mistral")
    assert r.returncode == 0, r.stderr
    for f in ("config.json", "model.safetensors", "tokenizer.json"):
        assert (ck / f).exists()
    assert json.loads((ck / "config.json").read_text())["model_type"] == "mistral"
    r = _run(
        "scripts/sample.py",
        "--hf_dir",
        str(ck),
        "--prompt",
        "What is 2+3?",
        "--prompt",
        "Hi",
        "--max_new_tokens",
        "5",
        "--temperature",
        "0",
        "--jsonl",
    )
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    assert [row["prompt"] for row in rows] == ["What is 2+3?", "Hi"]
    assert all(1 <= row["tokens"] <= 5 for row in rows)
    # Greedy decoding is reproducible across processes.
    r2 = _run(
        "scripts/sample.py",
        "--hf_dir",
        str(ck),
        "--prompt",
        "What is 2+3?",
        "--prompt",
        "Hi",
        "--max_new_tokens",
        "5",
        "--temperature",
        "0",
        "--jsonl",
    )
    assert r2.stdout == r.stdout


def test_sample_without_prompts_is_a_usage_error(tmp_path):
    r = _run("scripts/sample.py", "--hf_dir", str(tmp_path))
    assert r.returncode == 2 and "prompt" in r.stderr
