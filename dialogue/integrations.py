"""Integrations and their API keys: who may call the HTTP API, in which user-id namespace, with which scopes.

An integration (a customer-service platform, a website widget, a script) has a name, a namespace and scopes
(`chat`, `memory`, `admin`). Its key is shown once, when it is created; only its sha256 is stored, so a leaked
database holds no usable key. The ids a key sends are taken inside its namespace (`acme` + `lena` → `acme:lena`),
so one integration can never name another's users or conversations; an `admin` key names full ids.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from dataclasses import dataclass

from sqlalchemy.exc import IntegrityError
from sqlmodel import select

from dialogue.errors import InvalidInput, NotFound
from dialogue.store import IntegrationRow, TranscriptStore, utcnow

SCOPES = ("chat", "memory", "admin")
NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,31}$")
# Namespaces the channels use for their own users (`telegram:<uid>`, `chatwoot:<acct>:<id>`): no key may take them.
RESERVED_NAMESPACES = frozenset({"telegram", "chatwoot", "repl", "legacy", "open"})
KEY_PREFIX = "rk_"


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()


@dataclass(frozen=True)
class Integration:
    """What a request's key stands for; `namespace` None means ids are used as given (admin, legacy, open)."""

    id: int | None
    name: str
    namespace: str | None
    scopes: frozenset[str]
    rate_per_minute: float | None = None  # None: the settings' rate; 0: no limit
    user_rate_per_minute: float | None = None

    def to_json(self, **extra) -> dict:
        return {"id": self.id, "name": self.name, "namespace": self.namespace, "scopes": sorted(self.scopes),
                "rate_per_minute": self.rate_per_minute, "user_rate_per_minute": self.user_rate_per_minute, **extra}

    @property
    def admin(self) -> bool:
        return "admin" in self.scopes


def parse_scopes(text: str) -> frozenset[str]:
    scopes = frozenset(part.strip() for part in text.split(",") if part.strip())
    unknown = scopes - set(SCOPES)
    if not scopes or unknown:
        raise InvalidInput(f"scopes are a comma-separated choice of {', '.join(SCOPES)}"
                           + (f" (unknown: {', '.join(sorted(unknown))})" if unknown else ""))
    return scopes


class IntegrationStore:
    """Create, list, revoke and look up integrations in the transcript database."""

    def __init__(self, transcripts: TranscriptStore) -> None:
        self.transcripts = transcripts

    def create(self, name: str, *, scopes: str | frozenset[str], namespace: str | None = None,
               rate_per_minute: float | None = None, user_rate_per_minute: float | None = None) -> tuple[Integration, str]:
        """A new integration and its key; the key is returned once and never stored. Rates are requests a minute
        for the whole key and for each of its users (None: the settings' defaults; 0: no limit)."""
        for rate in (rate_per_minute, user_rate_per_minute):
            if rate is not None and not (0 <= rate <= 1_000_000):
                raise InvalidInput("a rate is requests a minute, from 0 (no limit) to 1000000")
        if not NAME.match(name or ""):
            raise InvalidInput("the name is 1-32 of lower-case letters, digits, _ and -, starting with a letter or digit")
        namespace = namespace or name
        if not NAME.match(namespace):
            raise InvalidInput("the namespace is 1-32 of lower-case letters, digits, _ and - (no ':')")
        if namespace in RESERVED_NAMESPACES:
            raise InvalidInput(f"namespace {namespace!r} is a channel's own; choose another")
        scope_set = parse_scopes(scopes) if isinstance(scopes, str) else frozenset(scopes)
        key = KEY_PREFIX + secrets.token_urlsafe(32)
        with self.transcripts.session() as session:
            taken = session.exec(select(IntegrationRow).where(
                IntegrationRow.revoked_at.is_(None),
                (IntegrationRow.name == name) | (IntegrationRow.namespace == namespace))).first()
            if taken is not None:
                raise InvalidInput(f"an active integration already has that {'name' if taken.name == name else 'namespace'}")
            row = IntegrationRow(name=name, namespace=namespace, scopes=",".join(sorted(scope_set)),
                                 key_hash=hash_key(key), rate_per_minute=rate_per_minute,
                                 user_rate_per_minute=user_rate_per_minute)
            session.add(row)
            try:
                session.commit()
            except IntegrityError:
                raise InvalidInput("that key exists already") from None
            return _integration(row), key

    def list(self, *, include_revoked: bool = True) -> list[dict]:
        with self.transcripts.session() as session:
            rows = session.exec(select(IntegrationRow).order_by(IntegrationRow.id)).all()
        return [_integration(r).to_json(created_at=r.created_at.isoformat(),
                                        revoked_at=r.revoked_at.isoformat() if r.revoked_at else None)
                for r in rows if include_revoked or r.revoked_at is None]

    def revoke(self, name_or_id: str) -> Integration:
        """Revoke the active integration of that name (or that id); its key stops working at once."""
        with self.transcripts.session() as session:
            query = select(IntegrationRow).where(IntegrationRow.revoked_at.is_(None))
            if name_or_id.isdigit():
                query = query.where((IntegrationRow.id == int(name_or_id)) | (IntegrationRow.name == name_or_id))
            else:
                query = query.where(IntegrationRow.name == name_or_id)
            row = session.exec(query).first()
            if row is None:
                raise NotFound(f"no active integration {name_or_id!r}")
            row.revoked_at = utcnow()
            session.add(row)
            session.commit()
            return _integration(row)

    def identify(self, key: str) -> Integration | None:
        """The active integration whose key this is, else None (looked up by hash: the key is never compared)."""
        with self.transcripts.session() as session:
            row = session.exec(select(IntegrationRow).where(
                IntegrationRow.key_hash == hash_key(key), IntegrationRow.revoked_at.is_(None))).first()
        return _integration(row) if row is not None else None

    def any_active(self) -> bool:
        with self.transcripts.session() as session:
            return session.exec(select(IntegrationRow.id).where(IntegrationRow.revoked_at.is_(None)).limit(1)).first() is not None


def _integration(row: IntegrationRow) -> Integration:
    scopes = frozenset(row.scopes.split(","))
    return Integration(id=row.id, name=row.name, namespace=None if "admin" in scopes else row.namespace, scopes=scopes,
                       rate_per_minute=row.rate_per_minute, user_rate_per_minute=row.user_rate_per_minute)
