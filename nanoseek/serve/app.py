"""The OpenAI-compatible HTTP API (FastAPI) over one engine: `create_app(engine, tokenizer, name)`.

    GET  /v1/models             the one model served
    POST /v1/chat/completions   messages -> the model's chat template -> choices (or SSE chunks)
    POST /v1/completions        raw prompts (text or token ids) -> choices (or SSE chunks)
    GET  /health                200 {"status": "ok"} while the engine thread runs, else 503
    GET  /metrics               JSON counters: requests, tokens, batch sizes seen (batching proof)

Conventions (REFERENCE §4): streams are Server-Sent Events of `chat.completion.chunk` (or
`text_completion`) objects ending with `data: [DONE]`; `usage` comes with every non-streamed
response and, with `stream_options.include_usage`, as a last chunk with no choices. R1 thinking
goes to `reasoning_content`, the answer to `content` (reasoning.py). Every refusal is a JSON
`{"error": {"message", "type", "code", "param"}}` with a 4xx status (400 bad JSON or value,
401 missing or wrong key, 404 unknown model or route, 429 too many sequences in flight); an
unexpected failure is a 500 with a generic message, the traceback goes to the server log only.

Threading: handlers run on uvicorn's event loop and never touch the model; `EngineLoop`
(loop.py) owns the engine in one thread and batches all requests in flight. A client that
disconnects (closed stream, or a non-streamed request whose socket closes) aborts its requests.
"""

from __future__ import annotations

import hmac
import json
import logging
import os
from collections.abc import Sequence
from contextlib import asynccontextmanager
from typing import TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException

from nanoseek.data.tokenizer import Tokenizer
from nanoseek.infer.engine import Engine
from nanoseek.serve.handlers import ClientGone, OpenAIServer, error_response
from nanoseek.serve.schemas import APIError, ChatCompletionRequest, CompletionRequest

log = logging.getLogger("nanoseek.serve")
T = TypeVar("T", bound=BaseModel)


class BearerAuth:
    """ASGI middleware: /v1/* needs `Authorization: Bearer KEY` (checked before the body is
    read, so a bad key is a 401 whatever the body). /health and /metrics stay open."""

    def __init__(self, app, api_key: str):
        self.app, self.key = app, api_key.encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1"):
            headers = dict(scope["headers"])
            scheme, _, token = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.encode(), self.key):
                msg = "missing API key" if not token else "incorrect API key"
                e = APIError(
                    f"{msg}: send 'Authorization: Bearer KEY'", 401, code="invalid_api_key"
                )
                await error_response(e)(scope, receive, send)
                return
        await self.app(scope, receive, send)


async def parse_body(request: Request, model: type[T]) -> T:
    """The JSON body as `model`. Parsed here rather than by FastAPI so that any content type is
    accepted (`curl -d` sends form-encoded) and every failure is one OpenAI-style 400."""
    raw = await request.body()
    if not raw.strip():
        raise APIError("the request has no JSON body", code="invalid_json")
    try:
        data = json.loads(raw)
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
        raise APIError(f"the body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(
            f"the body must be a JSON object, got {type(data).__name__}", code="invalid_json"
        )
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise validation_error(e.errors()) from None


def validation_error(errors: Sequence[dict]) -> APIError:
    """pydantic's list of errors -> one OpenAI-style error naming the first bad field."""
    if not errors:
        return APIError("invalid request")

    def where(err: dict) -> list[str]:  # a union (stop: str | list) adds the branch tried
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        return [x for x in loc if not x.startswith(("str", "list[", "int", "function-"))]

    loc = where(errors[0])
    same = [e for e in errors if where(e)[:1] == loc[:1]]  # the union's other branches
    msgs = " or ".join(dict.fromkeys(e["msg"] for e in same))
    more = len(errors) - len(same)
    tail = f" (and {more} more error{'s' if more > 1 else ''})" if more else ""
    return APIError(f"{'.'.join(loc) or 'body'}: {msgs}{tail}", param=loc[0] if loc else None)


def create_app(
    engine: Engine,
    tokenizer: Tokenizer,
    model_name: str,
    *,
    api_key: str | None = None,
    max_tokens: int | None = None,
    max_pending: int = 256,
    disconnect_poll_s: float = 0.5,
) -> FastAPI:
    """The server's ASGI app. `engine` (built with `tokenizer`) is driven by a thread the app
    starts and stops with its lifespan; nothing else may call `engine.step()` meanwhile.
    model_name: the `model` requests must name. api_key: require `Bearer` auth on /v1/*.
    max_tokens: cap on a request's max_tokens (default and most: the context). max_pending:
    most sequences in flight (running + queued; a request with n=k counts k), beyond: 429."""
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
        return await server.chat(await parse_body(request, ChatCompletionRequest), request)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await server.complete(await parse_body(request, CompletionRequest), request)

    return app


def served_name(model_dir: str | os.PathLike, name: str | None = None) -> str:
    """The `model` id clients send: `name` if given, else the directory's base name."""
    return name or os.path.basename(os.path.normpath(os.fspath(model_dir)))
