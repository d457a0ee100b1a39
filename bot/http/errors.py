"""The HTTP edge of the error family: every failure becomes JSON `{"error": …}`; bad input is always a 4xx.

Also the outermost ASGI layer: a request id for each request (echoed as `X-Request-ID`, attached to every
log record), the body-size limit (read before the app sees anything), and one access-log line per request.
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from bot.http.disconnect import ClientGone
from dialogue.errors import GenerationError, InvalidInput, NotFound, Overloaded, RapportError, StoreUnavailable

logger = logging.getLogger(__name__)

request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")
REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")

STATUS_OF: list[tuple[type[RapportError], int]] = [
    (InvalidInput, 400),
    (NotFound, 404),
    (StoreUnavailable, 503),
    (GenerationError, 503),
    (Overloaded, 503),
]


class RequestIdFilter(logging.Filter):
    """Adds `request_id` to every log record, so one request's lines can be grepped together."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id_var.get()
        return True


def error_response(status: int, message: str, *, headers: dict[str, str] | None = None, **extra) -> JSONResponse:
    return JSONResponse({"error": message, **extra}, status_code=status, headers=headers)


def status_for(exc: RapportError) -> int:
    for kind, status in STATUS_OF:
        if isinstance(exc, kind):
            return status
    return 400


def describe_validation(exc: RequestValidationError) -> str:
    """One readable line from pydantic's error list: where and what, never the (possibly huge) input."""
    parts = []
    for error in exc.errors()[:3]:
        if error.get("type") == "json_invalid":
            parts.append(f"body is not valid JSON ({error.get('ctx', {}).get('error', 'decode error')})")
            continue
        where = ".".join(str(p) for p in error.get("loc", ()) if p not in ("body",)) or "body"
        parts.append(f"{where}: {error.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request"


def install_error_handlers(app: FastAPI) -> None:
    """JSON errors for validation failures, HTTP errors, our error family and anything unexpected."""

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(422, describe_validation(exc))

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else "request refused"
        return error_response(exc.status_code, message, headers=getattr(exc, "headers", None))

    @app.exception_handler(RapportError)
    async def on_rapport_error(request: Request, exc: RapportError) -> JSONResponse:
        status = status_for(exc)
        if status >= 500:
            logger.warning("%s %s: %s", request.method, request.url.path, exc)
        headers = {"Retry-After": str(exc.retry_after)} if isinstance(exc, Overloaded) else None
        return error_response(status, str(exc) or exc.__class__.__name__, headers=headers)

    @app.exception_handler(ClientGone)
    async def on_client_gone(request: Request, exc: ClientGone) -> JSONResponse:
        logger.info("%s %s: the client left before its answer; the work was cancelled", request.method,
                    request.url.path)
        return error_response(499, "client closed the request")  # nobody reads it; the access log and metrics do

    @app.exception_handler(Exception)
    async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(500, "internal error", request_id=request_id_var.get())


class EdgeMiddleware:
    """Request id, body limit and access log, in plain ASGI so streamed responses pass untouched."""

    def __init__(self, app: ASGIApp, *, max_body_bytes: int, on_done=None) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.on_done = on_done  # (method, route, status, seconds) -> None, for metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        given = headers.get("x-request-id", "")
        request_id = given if REQUEST_ID.match(given) else uuid.uuid4().hex[:16]
        token = request_id_var.set(request_id)
        started = time.perf_counter()
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", request_id.encode())]
            await send(message)

        try:
            body = await self._read_body(headers, receive)
            if body is None:
                response = error_response(413, f"request body is larger than {self.max_body_bytes} bytes")
                await response(scope, receive, send_with_id)
                return
            await self.app(scope, _replay(body, receive), send_with_id)
        finally:
            elapsed = time.perf_counter() - started
            route = scope.get("route")
            path = getattr(route, "path", None) or "unmatched"
            logger.info("method=%s route=%s status=%s ms=%.1f", scope["method"], path, status, elapsed * 1000)
            if self.on_done is not None:
                self.on_done(scope["method"], path, status, elapsed)
            request_id_var.reset(token)

    async def _read_body(self, headers: dict[str, str], receive: Receive) -> bytes | None:
        """The whole body, or None when it is over the limit (judged by Content-Length when sent)."""
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_body_bytes:
            return None
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                break  # a disconnect before the body was complete: let the app see an empty one
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    """A receive that yields the already-read body once, then defers to the server (disconnects)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


def json_line(data: object) -> str:
    return json.dumps(data, ensure_ascii=False, separators=(",", ":"))
