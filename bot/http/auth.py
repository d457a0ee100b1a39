"""Who may call the API: bearer keys compared in constant time, admin keys for admin routes, a rate per key.

With neither `RAPPORT_API_KEYS` nor `RAPPORT_ADMIN_KEYS` set the API is open (the embedded default, bound
to 127.0.0.1); once any key is set, every `/v1` route needs one. Keys are never logged: a caller is named
by a short hash of its key wherever a name is needed (rate limiting, derived user ids).
"""

from __future__ import annotations

import hashlib
import hmac
import math
import threading
import time
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, HTTPException, Request

from dialogue.settings import Settings


@dataclass(frozen=True)
class Caller:
    """An authenticated caller: `name` is a hash of its key (or its address when the API is open)."""

    name: str
    admin: bool


def key_name(key: str) -> str:
    return "key-" + hashlib.sha256(key.encode()).hexdigest()[:12]


def _matches(candidate: bytes, keys: list[bytes]) -> bool:
    """Constant time in the key's content; every configured key is compared, match or not."""
    found = False
    for key in keys:
        found |= hmac.compare_digest(candidate, key)
    return found


class ApiKeys:
    """The configured keys, as bytes; admin keys are valid API keys too."""

    def __init__(self, settings: Settings) -> None:
        self.admin = [k.encode() for k in settings.admin_keys]
        self.plain = [k.encode() for k in settings.api_keys]

    @property
    def required(self) -> bool:
        return bool(self.admin or self.plain)

    def identify(self, authorization: str | None, client: str) -> Caller:
        """The caller behind an `Authorization` header; 401 when keys are required and this is not one."""
        if not self.required:
            return Caller(name=f"addr-{client}", admin=True)
        scheme, _, token = (authorization or "").partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token or len(token) > 512:
            raise HTTPException(401, "missing or malformed Authorization: Bearer <key>",
                                headers={"WWW-Authenticate": "Bearer"})
        candidate = token.encode("utf-8", "surrogateescape")
        is_admin = _matches(candidate, self.admin)
        if not (is_admin or _matches(candidate, self.plain)):
            raise HTTPException(401, "invalid API key", headers={"WWW-Authenticate": "Bearer"})
        return Caller(name=key_name(token), admin=is_admin)


class RateLimiter:
    """A token bucket per caller: `burst` requests at once, refilled at `per_minute`; 429 with Retry-After."""

    def __init__(self, per_minute: float, burst: int) -> None:
        self.rate = per_minute / 60.0  # tokens per second
        self.burst = float(burst)
        self._buckets: dict[str, tuple[float, float]] = {}  # name -> (tokens, updated at)
        self._lock = threading.Lock()

    def check(self, name: str) -> None:
        if self.rate <= 0:
            return
        now = time.monotonic()
        with self._lock:
            tokens, updated = self._buckets.get(name, (self.burst, now))
            tokens = min(self.burst, tokens + (now - updated) * self.rate)
            if tokens < 1.0:
                self._buckets[name] = (tokens, now)
                wait = math.ceil((1.0 - tokens) / self.rate)
                raise HTTPException(429, f"rate limit exceeded; retry in {wait} s", headers={"Retry-After": str(wait)})
            self._buckets[name] = (tokens - 1.0, now)
            if len(self._buckets) > 100_000:  # forget idle callers rather than grow without bound
                self._buckets = {k: v for k, v in self._buckets.items() if now - v[1] < 600}


def authenticate(request: Request) -> Caller:
    """Dependency for every `/v1` route: a known key (when keys are set) within its rate."""
    state = request.app.state
    client = request.client.host if request.client else "unknown"
    caller = state.keys.identify(request.headers.get("authorization"), client)
    state.limiter.check(caller.name)
    return caller


def authenticate_admin(caller: Annotated[Caller, Depends(authenticate)]) -> Caller:
    """Dependency for admin routes: 403 for a valid key that is not an admin key."""
    if not caller.admin:
        raise HTTPException(403, "this route needs an admin key")
    return caller


CallerDep = Annotated[Caller, Depends(authenticate)]
AdminDep = Annotated[Caller, Depends(authenticate_admin)]
