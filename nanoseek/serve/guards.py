"""What the server takes from the wire, checked before it costs anything: the key, the body's
size, its JSON. Every refusal is one OpenAI-style error naming what was wrong, never a 500.

    BearerAuth      every route but /health needs the key (before the body is read)
    read_body       the body, refused with 413 as soon as it passes `max_bytes`
    parse_body      body -> request model, off the event loop; any failure is a 400
    exposure_warning  the line `nanoseek serve` prints when it listens beyond this machine
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
from collections.abc import Sequence
from typing import TypeVar

from fastapi import Request
from pydantic import BaseModel, ValidationError
from starlette.requests import ClientDisconnect

from nanoseek.serve.handlers import ClientGone, error_response
from nanoseek.serve.schemas import APIError

T = TypeVar("T", bound=BaseModel)

# A chat body is text: 1 MiB is ~250k tokens, far beyond a context nanoseek serves, yet small
# enough that parsing and templating it takes milliseconds, not seconds.
DEFAULT_MAX_REQUEST_BYTES = 1 << 20
OPEN_PATHS = ("/health",)  # a load balancer's probe carries no key


class BearerAuth:
    """ASGI middleware: every route except /health needs `Authorization: Bearer KEY`, checked
    before the body is read (a bad key is a 401 whatever the body). /metrics and /openapi.json
    describe the deployment, so they are guarded too; an unknown path is a 401, not a 404, so
    the routes cannot be probed without the key."""

    def __init__(self, app, api_key: str):
        self.app, self.key = app, api_key.encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"] not in OPEN_PATHS:
            headers = dict(scope["headers"])
            scheme, _, token = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
            ok = scheme.lower() == "bearer" and hmac.compare_digest(
                token.encode("latin-1"), self.key
            )
            if not ok:
                msg = "missing API key" if not token else "incorrect API key"
                e = APIError(
                    f"{msg}: send 'Authorization: Bearer KEY'", 401, code="invalid_api_key"
                )
                await error_response(e)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def too_large(limit: int, size: int | None = None) -> APIError:
    got = f" ({size} bytes by its Content-Length)" if size is not None else ""
    return APIError(
        f"the request body is larger than this server's limit of {limit} bytes{got}",
        413,
        code="request_too_large",
    )


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The whole body, at most `max_bytes`. A Content-Length beyond the limit is refused before
    a byte is read; a chunked body (no length) as soon as it passes the limit. What the client
    still sends is read and dropped by uvicorn, so the connection survives and the client sees
    the 413 instead of a reset."""
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > max_bytes:
        raise too_large(max_bytes, int(length))
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_bytes:
                raise too_large(max_bytes)
            chunks.append(chunk)
    except ClientDisconnect:  # gone mid-body: nobody reads the answer, and it is not a bug
        raise ClientGone() from None
    return b"".join(chunks)


async def parse_body(request: Request, model: type[T], max_bytes: int) -> T:
    """The JSON body as `model`. Parsed here rather than by FastAPI so that any content type is
    accepted (`curl -d` sends form-encoded) and every failure is one OpenAI-style 400; the
    parsing runs in a worker thread so a large body cannot hold up other requests."""
    raw = await read_body(request, max_bytes)
    return await asyncio.to_thread(decode, raw, model)


def decode(raw: bytes, model: type[T]) -> T:
    if not raw.strip():
        raise APIError("the request has no JSON body", code="invalid_json")
    try:
        data = json.loads(raw)
    except RecursionError:  # e.g. [[[[...]]]] 100,000 deep: the parser recurses per level
        raise APIError(
            "the body is not valid JSON: nested too deeply", code="invalid_json"
        ) from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, a 5000-digit integer
        raise APIError(f"the body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(
            f"the body must be a JSON object, got {type(data).__name__}", code="invalid_json"
        )
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise validation_error(e.errors()) from None
    except RecursionError:  # nesting the parser took but validation did not
        raise APIError("the body is nested too deeply", code="invalid_json") from None


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


def is_local(host: str) -> bool:
    """Whether `host` is reachable from this machine only (a loopback address or name)."""
    if host.lower() in ("localhost", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def exposure_warning(host: str, api_key: str | None) -> str | None:
    """The one-line warning for a server other machines can reach without a key, else None."""
    if api_key or is_local(host):
        return None
    return (
        f"warning: listening on {host} without --api-key: anyone who can reach this address "
        "can use the model (set --api-key or $NANOSEEK_API_KEY, or bind 127.0.0.1)"
    )
