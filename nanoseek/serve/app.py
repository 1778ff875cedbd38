"""The OpenAI-compatible HTTP API (FastAPI) over one engine: `create_app(engine, tokenizer, name)`.

    GET  /v1/models             the one model served
    POST /v1/chat/completions   messages -> the model's chat template -> choices (or SSE chunks)
    POST /v1/completions        raw prompts (text or token ids) -> choices (or SSE chunks)
    GET  /health                200 {"status": "ok"} while the engine thread runs, else 503
    GET  /metrics               JSON counters: requests, tokens, batch sizes seen (batching proof)

With an API key every route but /health needs it (guards.py); without one the server should
only listen on 127.0.0.1, and `nanoseek serve` warns when it does not.

Conventions (as OpenAI's API): streams are Server-Sent Events of `chat.completion.chunk` (or
`text_completion`) objects ending with `data: [DONE]`; `usage` comes with every non-streamed
response and, with `stream_options.include_usage`, as a last chunk with no choices. R1 thinking
goes to `reasoning_content`, the answer to `content` (reasoning.py). Every refusal is a JSON
`{"error": {"message", "type", "code", "param"}}` with a 4xx status (400 bad JSON or value,
401 missing or wrong key, 404 unknown model or route, 413 body over `max_request_bytes`, 429
too many sequences in flight); no request body can cause a 500: one is a server bug (generic
message; the traceback goes to the server log only).

Threading: handlers run on uvicorn's event loop and never touch the model; parsing, templating
and tokenising run in worker threads (so one large request cannot stall the others); `EngineLoop`
(loop.py) owns the engine in one thread and batches all requests in flight. A client that
disconnects (closed stream, or a non-streamed request whose socket closes) aborts its requests.
"""

from __future__ import annotations

import logging
import os
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from nanoseek.data.tokenizer import Tokenizer
from nanoseek.infer.engine import Engine
from nanoseek.serve.guards import (
    DEFAULT_MAX_REQUEST_BYTES,
    BearerAuth,
    parse_body,
    validation_error,
)
from nanoseek.serve.handlers import ClientGone, OpenAIServer, error_response
from nanoseek.serve.schemas import APIError, ChatCompletionRequest, CompletionRequest

log = logging.getLogger("nanoseek.serve")


def create_app(
    engine: Engine,
    tokenizer: Tokenizer,
    model_name: str,
    *,
    api_key: str | None = None,
    max_tokens: int | None = None,
    max_pending: int = 256,
    disconnect_poll_s: float = 0.5,
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
) -> FastAPI:
    """The server's ASGI app. `engine` (built with `tokenizer`) is driven by a thread the app
    starts and stops with its lifespan; nothing else may call `engine.step()` meanwhile.
    model_name: the `model` requests must name. api_key: require `Bearer` auth on /v1/*.
    max_tokens: cap on a request's max_tokens (default and most: the context). max_pending:
    most sequences in flight (running + queued; a request with n=k counts k), beyond: 429.
    max_request_bytes: largest request body, beyond: 413."""
    if max_request_bytes < 1:
        raise ValueError(f"max_request_bytes must be >= 1, got {max_request_bytes}")
    server = OpenAIServer(
        engine,
        tokenizer,
        model_name,
        max_tokens=max_tokens,
        max_pending=max_pending,
        disconnect_poll_s=disconnect_poll_s,
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        server.loop.start()
        try:
            yield
        finally:
            server.loop.stop()

    app = FastAPI(title="nanoseek", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.server = server
    app.state.max_request_bytes = max_request_bytes
    if api_key:
        app.add_middleware(BearerAuth, api_key=api_key)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        return error_response(e)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError):
        return error_response(validation_error(e.errors()))

    @app.exception_handler(HTTPException)
    async def _http(request: Request, e: HTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        return error_response(APIError(str(e.detail), e.status_code, code=code))

    @app.exception_handler(ClientGone)
    async def _gone(request: Request, e: ClientGone):
        return error_response(APIError("client closed the request", 499, code="client_closed"))

    @app.exception_handler(Exception)
    async def _bug(request: Request, e: Exception):
        # Starlette re-raises after this handler, so uvicorn logs the traceback (server side)
        err = APIError("internal server error", 500, type="server_error", code="internal_error")
        return error_response(err)

    @app.get("/health")
    async def health():
        if server.loop.alive:
            return {"status": "ok"}
        return JSONResponse({"status": "error", "reason": "engine thread not running"}, 503)

    @app.get("/metrics")
    async def metrics():
        return server.metrics()

    @app.get("/v1/models")
    async def models():
        return server.models().model_dump()

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        server.check_model(model_id)
        return server.models().data[0].model_dump()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await server.chat(
            await parse_body(request, ChatCompletionRequest, max_request_bytes), request
        )

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await server.complete(
            await parse_body(request, CompletionRequest, max_request_bytes), request
        )

    return app


def served_name(model_dir: str | os.PathLike, name: str | None = None) -> str:
    """The `model` id clients send: `name` if given, else the directory's base name."""
    return name or os.path.basename(os.path.normpath(os.fspath(model_dir)))
