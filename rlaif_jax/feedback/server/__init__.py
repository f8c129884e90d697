"""A local OpenAI-compatible server: aiohttp HTTP layer over pluggable backends."""

from rlaif_jax.feedback.server.app import (
    Backend,
    BackendError,
    Choice,
    Completion,
    ServerThread,
    make_app,
    run_chat,
    serve_forever,
)

__all__ = ["Backend", "BackendError", "Choice", "Completion", "ServerThread", "make_app", "run_chat", "serve_forever"]
