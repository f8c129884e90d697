"""An OpenAI-compatible HTTP server (aiohttp) over a pluggable backend.

Routes: POST /v1/chat/completions, GET /v1/models, and the Batch API subset the client
uses (POST /v1/files, GET /v1/files/{id}/content, POST /v1/batches, GET /v1/batches/{id}),
so the same offline pipeline (online or batch mode) runs against a local model.

A backend maps one parsed chat-completions request to choices and usage; it knows nothing
about HTTP. Errors it raises as BackendError come back in OpenAI's error shape.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import json
import logging
import threading
import time
import uuid
from typing import Any, Optional, Protocol, Sequence

from aiohttp import web

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Choice:
    content: str
    finish_reason: str = "stop"
    # OpenAI's shape: {"content": [{"token", "logprob", "top_logprobs": [{"token", "logprob"}]}]}
    logprobs: Optional[dict] = None


@dataclasses.dataclass
class Completion:
    choices: list
    prompt_tokens: int = 0
    completion_tokens: int = 0
    model: Optional[str] = None


class BackendError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.type = status, message, type_


class Backend(Protocol):
    """What a model behind the server implements."""

    def model_ids(self) -> Sequence[str]: ...

    async def complete(self, request: dict) -> Completion: ...


def error_json(status: int, message: str, type_: str = "invalid_request_error", headers=None) -> web.Response:
    body = {"error": {"message": message, "type": type_, "param": None, "code": None}}
    return web.json_response(body, status=status, headers=headers)


def validate_chat_request(body: Any) -> dict:
    """Checks the fields every backend relies on; raises BackendError(400) naming the field."""
    if not isinstance(body, dict):
        raise BackendError(400, "request body must be a JSON object")
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise BackendError(400, "'messages' must be a non-empty list")
    for i, m in enumerate(msgs):
        if (
            not isinstance(m, dict)
            or m.get("role") not in ("system", "user", "assistant")
            or not isinstance(m.get("content"), str)
        ):
            raise BackendError(400, f"messages[{i}] needs a role (system/user/assistant) and string content")
    if not isinstance(body.get("model"), str):
        raise BackendError(400, "'model' must be a string")
    n = body.get("n", 1)
    if not isinstance(n, int) or not 1 <= n <= 128:
        raise BackendError(400, "'n' must be an integer in [1, 128]")
    for name, lo, hi in (("temperature", 0.0, 2.0), ("top_p", 0.0, 1.0)):
        v = body.get(name)
        if v is not None and (not isinstance(v, (int, float)) or not lo <= v <= hi):
            raise BackendError(400, f"'{name}' must be a number in [{lo}, {hi}]")
    mt = body.get("max_tokens", body.get("max_completion_tokens"))
    if mt is not None and (not isinstance(mt, int) or mt < 1):
        raise BackendError(400, "'max_tokens' must be a positive integer")
    if body.get("stream"):
        raise BackendError(400, "streaming is not supported by this server")
    return body


def completion_body(c: Completion, model: str) -> dict:
    return {
        "id": "chatcmpl-" + uuid.uuid4().hex[:24],
        "object": "chat.completion",
        "created": int(time.time()),
        "model": c.model or model,
        "choices": [
            {
                "index": i,
                "message": {"role": "assistant", "content": ch.content},
                "finish_reason": ch.finish_reason,
                "logprobs": ch.logprobs,
            }
            for i, ch in enumerate(c.choices)
        ],
        "usage": {
            "prompt_tokens": c.prompt_tokens,
            "completion_tokens": c.completion_tokens,
            "total_tokens": c.prompt_tokens + c.completion_tokens,
        },
    }


async def run_chat(backend: Backend, body: Any) -> tuple[int, dict]:
    """(HTTP status, JSON body) for one chat-completions request body."""
    try:
        body = validate_chat_request(body)
        models = list(backend.model_ids())
        if models and body["model"] not in models:
            raise BackendError(404, f"model {body['model']!r} not served here; try one of {models}", "not_found_error")
        c = await backend.complete(body)
    except BackendError as e:
        return e.status, {"error": {"message": e.message, "type": e.type, "param": None, "code": None}}
    return 200, completion_body(c, body["model"])


BACKEND_KEY = web.AppKey("backend", object)
STATE_KEY = web.AppKey("state", dict)


def make_app(
    backend: Backend, api_key: Optional[str] = None, middlewares: Sequence = (), batch_delay_s: float = 0.0
) -> web.Application:
    """`api_key`: if set, requests must carry `Authorization: Bearer <api_key>` (compared in
    constant time); the key is never echoed back or logged. `batch_delay_s` holds batches
    "in_progress" that long before running them (to test resuming a submitted batch)."""

    @web.middleware
    async def auth(request: web.Request, handler):
        if api_key is not None:
            got = request.headers.get("Authorization", "")
            if not hmac.compare_digest(got.encode(), f"Bearer {api_key}".encode()):
                return error_json(401, "invalid or missing API key", "authentication_error")
        return await handler(request)

    app = web.Application(middlewares=[auth, *middlewares], client_max_size=256 * 1024**2)
    app[BACKEND_KEY] = backend
    app[STATE_KEY] = {"files": {}, "batches": {}, "tasks": set(), "batch_delay_s": batch_delay_s}
    app.router.add_post("/v1/chat/completions", _chat)
    app.router.add_get("/v1/models", _models)
    app.router.add_post("/v1/files", _upload)
    app.router.add_get("/v1/files/{file_id}/content", _file_content)
    app.router.add_post("/v1/batches", _create_batch)
    app.router.add_get("/v1/batches/{batch_id}", _get_batch)
    return app


async def _chat(request: web.Request) -> web.Response:
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        return error_json(400, f"request body is not valid JSON: {e}")
    status, out = await run_chat(request.app[BACKEND_KEY], body)
    return web.json_response(out, status=status)


async def _models(request: web.Request) -> web.Response:
    ids = request.app[BACKEND_KEY].model_ids()
    return web.json_response(
        {"object": "list", "data": [{"id": m, "object": "model", "created": 0, "owned_by": "rlaif_jax"} for m in ids]}
    )


async def _upload(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    reader = await request.multipart()
    data, purpose, filename = None, None, "upload"
    async for part in reader:
        if part.name == "file":
            filename = part.filename or filename
            data = await part.read()
        elif part.name == "purpose":
            purpose = (await part.read()).decode()
    if data is None:
        return error_json(400, "multipart form has no 'file' part")
    fid = "file-" + uuid.uuid4().hex[:24]
    state["files"][fid] = bytes(data)
    return web.json_response(
        {
            "id": fid,
            "object": "file",
            "bytes": len(data),
            "created_at": int(time.time()),
            "filename": filename,
            "purpose": purpose or "batch",
            "status": "processed",
        }
    )


async def _file_content(request: web.Request) -> web.Response:
    data = request.app[STATE_KEY]["files"].get(request.match_info["file_id"])
    if data is None:
        return error_json(404, "no such file", "not_found_error")
    return web.Response(body=data, content_type="application/octet-stream")


def _batch_json(b: dict) -> dict:
    return {k: v for k, v in b.items() if not k.startswith("_")}


async def _create_batch(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    body = await request.json()
    fid = body.get("input_file_id")
    if fid not in state["files"]:
        return error_json(404, f"input file {fid!r} not found", "not_found_error")
    if body.get("endpoint") != "/v1/chat/completions":
        return error_json(400, "only /v1/chat/completions batches are supported")
    bid = "batch_" + uuid.uuid4().hex[:24]
    b = {
        "id": bid,
        "object": "batch",
        "endpoint": body["endpoint"],
        "input_file_id": fid,
        "completion_window": body.get("completion_window", "24h"),
        "status": "in_progress",
        "created_at": int(time.time()),
        "output_file_id": None,
        "error_file_id": None,
        "request_counts": {"total": 0, "completed": 0, "failed": 0},
    }
    state["batches"][bid] = b
    task = asyncio.ensure_future(_process_batch(request.app, b))
    state["tasks"].add(task)
    task.add_done_callback(state["tasks"].discard)
    return web.json_response(_batch_json(b))


async def _process_batch(app: web.Application, b: dict) -> None:
    state, backend = app[STATE_KEY], app[BACKEND_KEY]
    if state["batch_delay_s"]:
        await asyncio.sleep(state["batch_delay_s"])
    lines = state["files"][b["input_file_id"]].decode("utf-8").splitlines()
    out, err = [], []
    for line in lines:
        if not line.strip():
            continue
        item = json.loads(line)
        status, body = await run_chat(backend, item.get("body"))
        rec = {
            "id": "batch_req_" + uuid.uuid4().hex[:16],
            "custom_id": item.get("custom_id"),
            "response": {"status_code": status, "request_id": uuid.uuid4().hex, "body": body},
            "error": None,
        }
        (out if status == 200 else err).append(json.dumps(rec))
    b["request_counts"] = {"total": len(out) + len(err), "completed": len(out), "failed": len(err)}
    for name, rows in (("output_file_id", out), ("error_file_id", err)):
        if rows:
            fid = "file-" + uuid.uuid4().hex[:24]
            state["files"][fid] = ("\n".join(rows) + "\n").encode()
            b[name] = fid
    b["status"] = "completed"
    b["completed_at"] = int(time.time())


async def _get_batch(request: web.Request) -> web.Response:
    b = request.app[STATE_KEY]["batches"].get(request.match_info["batch_id"])
    if b is None:
        return error_json(404, "no such batch", "not_found_error")
    return web.json_response(_batch_json(b))


class ServerThread:
    """Runs an app on 127.0.0.1 in a background thread (tests, benchmarks, notebooks).

    with ServerThread(make_app(backend)) as srv:
        client = FeedbackClient(base_url=srv.url, ...)
    """

    def __init__(self, app: web.Application, host: str = "127.0.0.1", port: int = 0):
        self.app, self.host, self.port = app, host, port
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._thread: Optional[threading.Thread] = None
        self._ready = threading.Event()
        self._stop: Optional[asyncio.Event] = None
        self._error: Optional[BaseException] = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def start(self) -> "ServerThread":
        self._thread = threading.Thread(target=self._run, name="openai-server", daemon=True)
        self._thread.start()
        self._ready.wait(30)
        if self._error:
            raise self._error
        return self

    def _run(self) -> None:
        self._loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._serve())
        except BaseException as e:  # pragma: no cover - surfaced by start()
            self._error = e
            self._ready.set()
        finally:
            self._loop.close()

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        runner = web.AppRunner(self.app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, self.host, self.port, backlog=1024)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]
        self._ready.set()
        await self._stop.wait()
        await runner.cleanup()

    def stop(self) -> None:
        if self._loop and self._stop and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread:
            self._thread.join(10)

    def __enter__(self) -> "ServerThread":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def serve_forever(app: web.Application, host: str = "127.0.0.1", port: int = 8000) -> None:
    web.run_app(app, host=host, port=port, access_log=None)
