"""Who may use the console: an admin key typed once into the login form, then a signed session cookie.

The key is checked by `admin_caller`, the one place the console asks the API's auth (`Caller.admin`), and again on
every request, so a key removed from the settings ends its sessions at once. Sessions live in this process only
(a restart logs operators out); the cookie carries a random session id signed with a per-process secret, is
HttpOnly and SameSite=Strict, and every form POST must also carry the session's CSRF token (the login form a
token of its own, double-submitted in a cookie).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
from dataclasses import dataclass
from urllib.parse import parse_qs

from fastapi import HTTPException, Request

from bot.http.auth import Caller

COOKIE = "rapport_console"
LOGIN_COOKIE = "rapport_console_login"
SESSION_SECONDS = 8 * 3600
MAX_SESSIONS = 1000


class LoginRequired(Exception):
    """No valid console session: a page redirects to the login form, a script call gets 401."""


class PageMissing(Exception):
    """A console page about something that is not there (an HTML 404, not the API's JSON one)."""


class CsrfRefused(Exception):
    """A form POST without the session's CSRF token."""


def admin_caller(request: Request, key: str) -> Caller | None:
    """The admin caller behind `key`, or None: the API's own key check and its `Caller.admin`."""
    client = request.client.host if request.client else "unknown"
    try:
        caller = request.app.state.keys.identify(f"Bearer {key}" if key else None, client)
    except HTTPException:
        return None
    return caller if caller.admin else None


@dataclass
class ConsoleSession:
    id: str
    key: str  # kept in this process's memory only, to re-check the key on every request
    caller: Caller
    csrf: str
    expires: float


class Sessions:
    """The console's live sessions, by id."""

    def __init__(self, ttl_s: float = SESSION_SECONDS) -> None:
        self.ttl_s = ttl_s
        self.secret = secrets.token_bytes(32)
        self._live: dict[str, ConsoleSession] = {}
        self._lock = threading.Lock()

    def sign(self, value: str) -> str:
        return f"{value}.{hmac.new(self.secret, value.encode(), hashlib.sha256).hexdigest()}"

    def unsign(self, signed: str | None) -> str | None:
        value, _, _ = (signed or "").rpartition(".")
        if value and hmac.compare_digest(self.sign(value), signed or ""):
            return value
        return None

    def open(self, key: str, caller: Caller) -> tuple[str, ConsoleSession]:
        """A new session; returns the cookie value with it."""
        session = ConsoleSession(id=secrets.token_urlsafe(24), key=key, caller=caller,
                                 csrf=secrets.token_urlsafe(24), expires=time.time() + self.ttl_s)
        with self._lock:
            now = time.time()
            if len(self._live) >= MAX_SESSIONS:
                self._live = {k: s for k, s in self._live.items() if s.expires > now}
            self._live[session.id] = session
        return self.sign(session.id), session

    def find(self, request: Request) -> ConsoleSession | None:
        """The request's session when its cookie is genuine, unexpired, and its key is still an admin key."""
        session_id = self.unsign(request.cookies.get(COOKIE))
        with self._lock:
            session = self._live.get(session_id) if session_id else None
            if session is not None and session.expires < time.time():
                del self._live[session.id]
                session = None
        if session is None:
            return None
        if admin_caller(request, session.key) is None:
            self.close(session.id)
            return None
        return session

    def close(self, session_id: str) -> None:
        with self._lock:
            self._live.pop(session_id, None)


def set_cookie(request: Request, response, name: str, value: str, *, max_age: int | None = SESSION_SECONDS) -> None:
    """HttpOnly, SameSite=Strict, for /admin only; Secure when the console is reached over HTTPS."""
    response.set_cookie(name, value, max_age=max_age, path="/admin", httponly=True, samesite="strict",
                        secure=request.url.scheme == "https")


def sessions_of(request: Request) -> Sessions:
    return request.app.state.console_sessions


def current_session(request: Request) -> ConsoleSession:
    """Dependency of every console route but the login form."""
    session = sessions_of(request).find(request)
    if session is None:
        raise LoginRequired()
    return session


async def form_of(request: Request) -> dict[str, str]:
    """The posted form (application/x-www-form-urlencoded), one value per field."""
    body = (await request.body()).decode("utf-8", "replace")
    return {k: v[-1] for k, v in parse_qs(body, keep_blank_values=True).items()}


async def checked_form(request: Request, session: ConsoleSession) -> dict[str, str]:
    """The form of a POST that carries the session's CSRF token (field `csrf` or header X-CSRF-Token)."""
    form = await form_of(request)
    token = form.get("csrf") or request.headers.get("x-csrf-token") or ""
    if not hmac.compare_digest(token.encode(), session.csrf.encode()):
        raise CsrfRefused()
    return form
