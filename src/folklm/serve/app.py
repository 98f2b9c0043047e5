"""The OpenAI-compatible HTTP server: ``build_app(ServeConfig)`` -> FastAPI application.

The app's lifespan loads the models and starts one engine (continuous batching thread)
per base model, and stops them on shutdown; tests build the app in-process. Routes are
thin: parse (``protocol``), look up the model (``models``), call the serving function
(``chat``, ``completions``, ``embeddings``). Every failure a client can cause is an
OpenAI-style error body ``{"error": {"message", "type", "param", "code"}}`` with a 4xx:
400 bad input (FastAPI's 422 validation errors included), 401 auth, 404 unknown model or
route, 413 body too large, 429 queue full (with ``Retry-After``).

The edges, for hostile clients (README "Security"): bound to a loopback address, only
requests whose ``Host`` names this machine (``localhost``, ``127.0.0.1``, ``[::1]``, or a
name in ``ServeConfig.allowed_hosts``) are served -- a web page cannot reach the server by
DNS rebinding (403, as Ollama's fix of CVE-2024-28224). With API keys set, every route
needs one except ``/health`` and the web chat's static files (which hold no data):
``/metrics`` and ``/openapi.json`` included. Error bodies carry no local paths and no
exception class names: :func:`public_message` removes them, the detail goes to the
``folklm.serve`` log.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

import folklm
from folklm.engine.multilora import MultiLoRA
from folklm.engine.scheduler import Engine, QueueFull
from folklm.errors import FolkError
from folklm.hub.defaults import DEFAULT_NAME
from folklm.serve import chat, completions, embeddings
from folklm.serve.auth import AuthError, check
from folklm.serve.config import ServeConfig
from folklm.serve.metrics import Metrics
from folklm.serve.models import ModelNotFound, ModelTable
from folklm.serve.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
    error_body,
)
from folklm.serve.runner import ClientGone

WEB = Path(__file__).parent / "web"
LOOPBACK = ("127.0.0.1", "localhost", "::1")
OPEN_PATHS = ("/health", "/", "/web/")  # no key needed (``/web/`` is a prefix)
log = logging.getLogger("folklm.serve")
_PATH = re.compile(r"(?<![\w#.$~/])(/[^\s'\"(),:;]+)")
_EXC_NAME = re.compile(r"\b[A-Z][A-Za-z]*(?:Error|Exception|Warning): ")


def public_message(message: str) -> str:
    """``message`` without local paths (a path whose first folder exists here becomes
    ``<path>``) and without exception class names, for an error body."""

    def hide(m: re.Match) -> str:
        path = m.group(1)
        top = "/" + path.split("/")[1]
        return "<path>" if path.count("/") > 1 and os.path.isdir(top) else path

    return _EXC_NAME.sub("", _PATH.sub(hide, message))


def host_allowed(host_header: str | None, allowed: list[str]) -> bool:
    """Whether a ``Host`` header names this machine (or an allowed name), port ignored."""
    if not host_header:
        return False
    host = host_header.strip().lower()
    if host.startswith("["):  # [::1]:8000
        host = host[1 : host.find("]")] if "]" in host else host
    elif host.count(":") == 1:
        host = host.split(":")[0]
    return host in LOOPBACK or host in [a.lower() for a in allowed]


class TrustedHost:
    """ASGI middleware: when bound to loopback, refuse requests whose ``Host`` is another
    name (DNS rebinding) with 403."""

    def __init__(self, app, allowed: list[str]):
        self.app, self.allowed = app, allowed

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            headers = dict(scope.get("headers") or [])
            raw = headers.get(b"host")
            host = raw.decode("latin-1") if raw is not None else None
            if not host_allowed(host, self.allowed):
                msg = (
                    f"Host header {host!r} is not allowed: this server is bound to loopback "
                    "(folk serve --allowed-host NAME to add a name)"
                )
                response = _error(403, msg, "invalid_request_error", code="host_not_allowed")
                return await response(scope, receive, send)
        return await self.app(scope, receive, send)


def _model_name(source: Any) -> str:
    if source is None:
        return DEFAULT_NAME
    if isinstance(source, str | Path):
        p = Path(source)
        return p.stem if p.suffix == ".gguf" else (p.name if p.exists() else str(source))
    return Path(getattr(source, "source", "model")).name or "model"


def load_engines(config: ServeConfig, table: ModelTable, metrics: Metrics) -> None:
    names = config.names or [None] * len(config.models)
    for source, name in zip(config.models, names, strict=True):
        llm = source if hasattr(source, "model") else folklm.load(source, dtype=config.dtype)
        lora = MultiLoRA(llm.model, table.resolve_path, config.max_adapters)
        engine = Engine(
            llm,
            max_batch=config.max_batch,
            max_queue=config.max_queue,
            max_len=config.max_len,
            kv_budget_bytes=config.kv_cache_bytes,
            lora=lora,
        )
        engine.observers.append(metrics.observe)
        table.add_base(name or _model_name(source), engine)
    for name, (base, path) in config.adapters.items():
        table.add_adapter(name, base, Path(path))
    for warning in table.discover():
        print(f"folk serve: warning: {warning}", file=sys.stderr)


def _error(status: int, message: str, type_: str, param=None, code=None, headers=None):
    return JSONResponse(error_body(message, type_, param, code), status, headers=headers)


class BodyLimit:
    """ASGI middleware: refuse request bodies above ``limit`` bytes with 413, early."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        too_big = declared is not None and (not declared.isdigit() or int(declared) > self.limit)
        chunks, size, more = [], 0, not too_big
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            too_big = size > self.limit
            if too_big:
                break
        if too_big:
            msg = f"request body too large: the limit is {self.limit} bytes"
            response = _error(413, msg, "invalid_request_error", code="request_too_large")
            return await response(scope, receive, send)
        body, sent = b"".join(chunks), False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)


def build_app(config: ServeConfig | None = None) -> FastAPI:
    """The server application; models load when its lifespan starts.

    Raises:
        FolkError: a bad setting (:meth:`ServeConfig.validate`), before anything loads.
    """
    config = (config or ServeConfig()).validate()
    table = ModelTable()
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        load_engines(config, table, metrics)
        try:
            yield
        finally:
            for served in table.bases.values():
                served.engine.shutdown()

    app = FastAPI(title="folklm", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.table, app.state.metrics, app.state.config = table, metrics, config
    app.add_middleware(BodyLimit, limit=config.max_body_bytes)
    if config.host in LOOPBACK:
        app.add_middleware(TrustedHost, allowed=list(config.allowed_hosts))

    @app.middleware("http")
    async def guard(request: Request, call_next):
        path = request.url.path
        route = path if path in KNOWN else "other"
        if path not in OPEN_PATHS[:2] and not path.startswith(OPEN_PATHS[2]):
            try:
                check(config.api_keys, request.headers.get("authorization"))
            except AuthError as exc:
                metrics.count_http(route, 401)
                return _error(401, str(exc), "invalid_request_error", code="invalid_api_key")
        response = await call_next(request)
        metrics.count_http(route, response.status_code)
        return response

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        err = (exc.errors() or [{}])[0]
        loc = [str(p) for p in err.get("loc", ()) if p != "body"]
        param = ".".join(loc) or None
        msg = str(err.get("msg", "invalid request"))
        if err.get("type") == "json_invalid":
            msg = "the request body is not valid JSON"
        return _error(400, f"{param + ': ' if param else ''}{msg}", "invalid_request_error", param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        return _error(exc.status_code, public_message(str(exc.detail)), "invalid_request_error")

    @app.exception_handler(ModelNotFound)
    async def _not_found(request: Request, exc: ModelNotFound):
        return _error(404, str(exc), "invalid_request_error", "model", "model_not_found")

    @app.exception_handler(QueueFull)
    async def _busy(request: Request, exc: QueueFull):
        headers = {"Retry-After": "1"}
        return _error(429, str(exc), "rate_limit_error", code="queue_full", headers=headers)

    @app.exception_handler(FolkError)
    async def _folk(request: Request, exc: FolkError):
        log.info("400 on %s: %s", request.url.path, exc)
        return _error(400, public_message(str(exc)), "invalid_request_error")

    @app.exception_handler(chat.EngineFailure)
    async def _engine(request: Request, exc: chat.EngineFailure):
        return _error(500, public_message(str(exc)), "server_error")

    @app.exception_handler(ClientGone)
    async def _gone(request: Request, exc: ClientGone):
        return _error(499, "the client closed the connection", "invalid_request_error")

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception):
        log.error("500 on %s", request.url.path, exc_info=exc)
        msg = "internal server error (the detail is in the server log)"
        return _error(500, msg, "server_error")

    @app.get("/health")
    async def health():
        return {"status": "ok", "models": [m.name for m in table.listing()]}

    @app.get("/metrics")
    async def metrics_text():
        engines = {name: s.engine for name, s in table.bases.items()}
        return PlainTextResponse(metrics.render(engines), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def list_models():
        data = [
            {
                "id": m.name,
                "object": "model",
                "created": m.created,
                "owned_by": "folklm",
                "parent": m.parent,
            }  # fmt: skip
            for m in table.listing()
        ]
        return {"object": "list", "data": data}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str):
        m = table.lookup(model_id)
        return {"id": m.name, "object": "model", "created": m.created, "owned_by": "folklm"}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        served = table.lookup(body.model)
        text = table.token_text[id(served.engine)]
        return await chat.create(body, served, text, request)

    @app.post("/v1/completions")
    async def text_completions(body: CompletionRequest, request: Request):
        served = table.lookup(body.model)
        text = table.token_text[id(served.engine)]
        return await completions.create(body, served, text, request, config.max_choices)

    @app.post("/v1/embeddings")
    async def create_embeddings(body: EmbeddingRequest):
        return await embeddings.create(body, table.lookup(body.model))

    @app.get("/")
    async def index():
        return FileResponse(WEB / "index.html", headers={"Cache-Control": "no-cache"})

    @app.get("/web/{name}")
    async def web_file(name: str):
        path = WEB / name
        if name not in {p.name for p in WEB.iterdir()} or not path.is_file():
            return _error(404, f"no such file: /web/{name}", "invalid_request_error")
        return FileResponse(path)

    app.state.started = time.time()
    return app


KNOWN = {
    "/",
    "/health",
    "/metrics",
    "/v1/models",
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
}
