"""Who may call the API: integrations' keys (hashed, with a namespace and scopes), rate limits per key and per user.

A key belongs to an integration (`rapport keys create`, `dialogue/integrations.py`): the user and conversation ids
it sends are taken inside its namespace (`acme` + `lena` → `acme:lena`), so no key reaches another integration's
users; `admin` is a scope, never the default, and an admin key names full ids. The legacy settings still work:
`RAPPORT_API_KEYS` (chat and memory) and `RAPPORT_ADMIN_KEYS` (admin too) are one integration, `legacy`, with ids
used as given, except ids of the form `ns:…`: that is the shape of every namespaced id (an integration's, a
channel's own `telegram:`/`chatwoot:`), now or created later, so a legacy key can never reach one; only admin does. With no key at all
the API answers only when the server was started `--open` (loopback only), as chat and memory, never admin.
Keys are never logged: a caller is named by a short hash of its key.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import math
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, HTTPException, Request

from dialogue.integrations import Integration, IntegrationStore
from dialogue.settings import Settings, reveal

logger = logging.getLogger(__name__)

# The shape of an id inside a namespace (an integration's `acme:lena`, a channel's `telegram:42`): a caller without
# a namespace of its own (legacy keys, open mode) may not name one, whether that namespace exists yet or not.
NAMESPACED = re.compile(r"^[a-z0-9][a-z0-9_-]{0,31}:")
DEFAULT_SCOPES = frozenset({"chat", "memory"})


@dataclass(frozen=True)
class Caller:
    """An authenticated caller: `name` is a hash of its key (or its address when the API is open).

    `namespace` None means ids are taken as given (admin keys, legacy keys, open mode)."""

    name: str
    admin: bool
    namespace: str | None = None
    scopes: frozenset[str] = field(default=DEFAULT_SCOPES)
    integration: str | None = None
    rate_per_minute: float | None = None  # the integration's own rates (None: the settings')
    user_rate_per_minute: float | None = None

    def require(self, scope: str) -> None:
        if not (self.admin or scope in self.scopes):
            raise HTTPException(403, f"this route needs a key with the {scope!r} scope")

    def user(self, user_id: str) -> str:
        """The stored id of a user the client names (inside the key's namespace)."""
        return self._inside(user_id, "user")

    def conversation(self, conversation_id: str) -> str:
        """The stored id of a conversation the client names (inside the key's namespace)."""
        return self._inside(conversation_id, "conversation")

    def shown(self, stored_id: str) -> str:
        """An id as the client knows it (its namespace taken off again)."""
        prefix = f"{self.namespace}:" if self.namespace else ""
        return stored_id[len(prefix):] if prefix and stored_id.startswith(prefix) else stored_id

    def owns(self, stored_user_id: str) -> bool:
        """Whether this caller may act on that stored user (and so on their conversations and turns)."""
        if self.admin:
            return True
        if self.namespace:
            return stored_user_id.startswith(f"{self.namespace}:")
        return not NAMESPACED.match(stored_user_id)

    def _inside(self, given: str, what: str) -> str:
        if self.admin:
            return given
        if self.namespace:
            return f"{self.namespace}:{given}"
        if NAMESPACED.match(given):  # a legacy or open caller may not name a channel's or an integration's users
            raise HTTPException(403, f"a {what} id of the form NAMESPACE:… belongs to an integration or a channel; "
                                     "only an admin key names it (or use a key of that integration)")
        return given


def key_name(key: str) -> str:
    return "key-" + hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()[:12]


def _matches(candidate: bytes, keys: list[bytes]) -> bool:
    """Constant time in the key's content; every configured key is compared, match or not."""
    found = False
    for key in keys:
        found |= hmac.compare_digest(candidate, key)
    return found


class ApiKeys:
    """The integrations' keys (in SQL) and the legacy keys of the settings; `open_api` answers without a key."""

    def __init__(self, settings: Settings, integrations: IntegrationStore | None = None, *,
                 open_api: bool = False) -> None:
        self.admin = [reveal(k).encode() for k in settings.admin_keys]
        self.plain = [reveal(k).encode() for k in settings.api_keys]
        self.integrations = integrations
        self.open_api = open_api
        if self.admin or self.plain:
            logger.warning("RAPPORT_API_KEYS/RAPPORT_ADMIN_KEYS act as one integration with ids as given: create a key "
                           "per integration (`rapport keys create NAME --scopes chat,memory`), move its clients to it "
                           "and remove these settings")

    def any(self) -> bool:
        return bool(self.admin or self.plain) or (self.integrations is not None and self.integrations.any_active())

    @property
    def required(self) -> bool:
        """Whether a request needs a key (any key exists, or the server was not started `--open`)."""
        return not self.open_api or self.any()

    def identify(self, authorization: str | None, client: str) -> Caller:
        """The caller behind an `Authorization` header; 401 when this is not a valid key."""
        scheme, _, token = (authorization or "").partition(" ")
        token = token.strip()
        if self.open_api and not self.any():  # no key exists to check (clients such as openai's send one anyway)
            return Caller(name=f"addr-{client}", admin=False)
        if scheme.lower() != "bearer" or not token or len(token) > 512:
            detail = "missing or malformed Authorization: Bearer <key>" if self.open_api or self.any() else \
                "no API keys are configured: create one with `rapport keys create NAME --scopes chat,memory`"
            raise HTTPException(401, detail, headers={"WWW-Authenticate": "Bearer"})
        candidate = token.encode("utf-8", "surrogateescape")
        is_admin, is_plain = _matches(candidate, self.admin), _matches(candidate, self.plain)
        if is_admin or is_plain:
            scopes = DEFAULT_SCOPES | ({"admin"} if is_admin else set())
            return Caller(name=key_name(token), admin=is_admin, scopes=frozenset(scopes), integration="legacy")
        found: Integration | None = self.integrations.identify(token) if self.integrations is not None else None
        if found is None:
            raise HTTPException(401, "invalid API key", headers={"WWW-Authenticate": "Bearer"})
        return Caller(name=f"int-{found.id}", admin=found.admin, namespace=found.namespace, scopes=found.scopes,
                      integration=found.name, rate_per_minute=found.rate_per_minute,
                      user_rate_per_minute=found.user_rate_per_minute)


class RateLimiter:
    """A token bucket per name: `burst` requests at once, refilled at `per_minute`; 429 with Retry-After."""

    def __init__(self, per_minute: float, burst: int) -> None:
        self.rate = per_minute / 60.0  # tokens per second
        self.burst = float(burst)
        self._buckets: dict[str, tuple[float, float]] = {}  # name -> (tokens, updated at)
        self._lock = threading.Lock()

    def check(self, name: str, what: str = "rate limit", per_minute: float | None = None) -> None:
        """One request of `name`, at `per_minute` when given (an integration's own rate), else the default."""
        rate = self.rate if per_minute is None else per_minute / 60.0
        if rate <= 0:
            return
        now = time.monotonic()
        with self._lock:
            tokens, updated = self._buckets.get(name, (self.burst, now))
            tokens = min(self.burst, tokens + (now - updated) * rate)
            if tokens < 1.0:
                self._buckets[name] = (tokens, now)
                wait = math.ceil((1.0 - tokens) / rate)
                raise HTTPException(429, f"{what} exceeded; retry in {wait} s", headers={"Retry-After": str(wait)})
            self._buckets[name] = (tokens - 1.0, now)
            if len(self._buckets) > 100_000:  # forget idle callers rather than grow without bound
                self._buckets = {k: v for k, v in self._buckets.items() if now - v[1] < 600}


def authenticate(request: Request) -> Caller:
    """Dependency for every `/v1` route: a known key (or the open mode) within its rate."""
    state = request.app.state
    client = request.client.host if request.client else "unknown"
    caller = state.keys.identify(request.headers.get("authorization"), client)
    state.limiter.check(caller.name, per_minute=caller.rate_per_minute)
    return caller


def limit_user(request: Request, caller: Caller, stored_user_id: str) -> None:
    """The per-end-user rate inside a key: one user of an integration cannot use up its whole rate."""
    request.app.state.user_limiter.check(f"{caller.name}/{stored_user_id}", "this user's rate limit",
                                         per_minute=caller.user_rate_per_minute)


def authenticate_admin(caller: Annotated[Caller, Depends(authenticate)]) -> Caller:
    """Dependency for admin routes: 403 for any caller without the admin scope (there is no open mode for them)."""
    if not caller.admin:
        raise HTTPException(403, "this route needs an admin key")
    return caller


def authenticate_chat(caller: Annotated[Caller, Depends(authenticate)]) -> Caller:
    caller.require("chat")
    return caller


def authenticate_memory(caller: Annotated[Caller, Depends(authenticate)]) -> Caller:
    caller.require("memory")
    return caller


CallerDep = Annotated[Caller, Depends(authenticate)]
ChatDep = Annotated[Caller, Depends(authenticate_chat)]
MemoryScopeDep = Annotated[Caller, Depends(authenticate_memory)]
AdminDep = Annotated[Caller, Depends(authenticate_admin)]
