"""Launching the processes of a multi-process CPU test (jax.distributed on 127.0.0.1)."""

import socket
import subprocess

import pytest


def free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def run_together(commands, env, timeout: float = 600) -> list[str]:
    """Starts every command at once, waits for all, and returns their combined outputs;
    fails the test (killing the others) when one runs past `timeout` or exits non-zero."""
    procs = [
        subprocess.Popen(c, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for c in commands
    ]
    outs = []
    for p in procs:
        try:
            outs.append(p.communicate(timeout=timeout)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail(f"{len(commands)}-process run timed out after {timeout}s")
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-4000:]
    return outs
