"""The browser's edge: a Host allowlist (DNS rebinding) and no cross-origin writes.

A web page can make a browser send requests to `127.0.0.1:8000` under a name of its own (DNS rebinding), or post a
form or a body-less `fetch` to it cross-site. The first is stopped by answering only the Host names we are
(`RAPPORT_ALLOWED_HOSTS`; unset = localhost, 127.0.0.1, ::1 and the bound address), the second by refusing a write
(POST, PUT, PATCH, DELETE, with a body or without) that a browser marks as cross-site (`Sec-Fetch-Site`) or that
carries an `Origin` other than the Host it was sent to. Servers (Chatwoot, Telegram, scripts) send neither header.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from urllib.parse import urlsplit

from starlette.types import ASGIApp, Receive, Scope, Send

from dialogue.settings import LOOPBACK_HOSTS

WRITES = frozenset({"POST", "PUT", "PATCH", "DELETE"})
WILDCARD_BINDS = ("0.0.0.0", "::", "")


def allowed_hosts(configured: Iterable[str], bound: str | None = None) -> frozenset[str]:
    """The Host names to answer: the configured ones, else loopback plus the bound address."""
    hosts = {h.strip().lower().strip("[]") for h in configured if h.strip()}
    if not hosts:
        hosts = set(LOOPBACK_HOSTS)
        if bound and bound not in WILDCARD_BINDS:
            hosts.add(bound.lower().strip("[]"))
    return frozenset(hosts)


def host_name(value: str) -> str:
    """`example.com:8000` → `example.com`, `[::1]:8000` → `::1`."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1:].split("]", 1)[0]
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


class GuardMiddleware:
    """Refuses requests for a Host we are not (421) and cross-origin writes (403), as JSON errors."""

    def __init__(self, app: ASGIApp, *, hosts: frozenset[str]) -> None:
        self.app = app
        self.hosts = hosts
        self.any_host = "*" in hosts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        host = headers.get("host", "")
        if not self.any_host and host_name(host) not in self.hosts:
            return await _refuse(send, 421, "this server does not answer for that Host "
                                            "(RAPPORT_ALLOWED_HOSTS lists the names it does)")
        if scope.get("method", "GET").upper() in WRITES and cross_origin(headers, host):
            return await _refuse(send, 403, "cross-origin writes are refused")
        await self.app(scope, receive, send)


def cross_origin(headers: dict[str, str], host: str) -> bool:
    site = headers.get("sec-fetch-site")
    if site is not None and site.lower() not in ("same-origin", "none"):
        return True
    origin = headers.get("origin")
    if origin is None:
        return False
    if origin == "null":  # sandboxed frames, file:// pages, some redirects: never our own page
        return True
    return urlsplit(origin).netloc.lower() != host.strip().lower()


async def _refuse(send: Send, status: int, message: str) -> None:
    body = json.dumps({"error": message}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
