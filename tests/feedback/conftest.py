"""Fixtures for the feedback tests: real HTTP servers on 127.0.0.1, started per test."""

import contextlib
import json
import os
import sys

import pytest

from rlaif_jax.feedback.client import FeedbackClient
from rlaif_jax.feedback.server.app import ServerThread, make_app
from rlaif_jax.feedback.server.testing import FaultInjector

SECRET = "sk-test-0123456789abcdefSECRET"
KEY_ENV = "RLAIF_TEST_API_KEY"


@pytest.fixture
def api_key(monkeypatch):
    monkeypatch.setenv(KEY_ENV, SECRET)
    return SECRET


@pytest.fixture
def serve():
    """serve(backend, faults=None, **make_app_kw) -> running ServerThread (stopped after the test)."""
    with contextlib.ExitStack() as stack:

        def start(backend, faults: FaultInjector = None, **kw):
            mws = [faults.middleware] if faults is not None else []
            kw.setdefault("api_key", SECRET)
            return stack.enter_context(ServerThread(make_app(backend, middlewares=mws, **kw)))

        yield start


def make_client(srv, tmp_path, model="teacher", cache="cache.jsonl", **kw):
    kw.setdefault("timeout_s", 0.5)
    kw.setdefault("backoff_base_s", 0.01)
    kw.setdefault("backoff_max_s", 0.05)
    kw.setdefault("max_attempts", 6)
    kw.setdefault("progress", False)
    kw.setdefault("prices", {model: (2.0, 4.0)})
    return FeedbackClient(
        model=model, cache_path=os.path.join(tmp_path, cache), base_url=srv.url, api_key_env=KEY_ENV, **kw
    )


REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def write_prompts_jsonl(path, texts):
    with open(path, "w") as f:
        for t in texts:
            f.write(json.dumps({"prompt": t}) + "\n")
    return str(path)


def stage_cmd(prompts, out_dir, cache, url, *gin_params):
    """scripts/feedback_teacher.py with the GPT-4 config pointed at a test server; extra
    bindings (e.g. "FeedbackClient.timeout_s=0.2") go last, so they win."""
    return [
        sys.executable,
        os.path.join(REPO, "scripts", "feedback_teacher.py"),
        f"--gin_file={os.path.join(REPO, 'configs/feedback/teacher_gpt4.gin')}",
        f"--gin_param=teacher_stage.prompts='{prompts}'",
        f"--gin_param=teacher_stage.out_dir='{out_dir}'",
        "--gin_param=teacher_stage.split=None",
        "--gin_param=TEACHER='teacher'",
        f"--gin_param=FeedbackClient.base_url='{url}'",
        f"--gin_param=FeedbackClient.cache_path='{cache}'",
        f"--gin_param=FeedbackClient.api_key_env='{KEY_ENV}'",
        "--gin_param=FeedbackClient.max_concurrency=2",
        "--gin_param=FeedbackClient.requests_per_minute=None",
        "--gin_param=FeedbackClient.tokens_per_minute=None",
        "--gin_param=FeedbackClient.prices={'teacher': (2.0, 4.0)}",
    ] + [f"--gin_param={g}" for g in gin_params]
