"""Fixtures for the feedback tests: real HTTP servers on 127.0.0.1, started per test."""

import contextlib
import os

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
    return FeedbackClient(model=model, cache_path=os.path.join(tmp_path, cache), base_url=srv.url,
                          api_key_env=KEY_ENV, **kw)
