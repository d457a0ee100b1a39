"""The transcript store: users, conversations, turns and ratings, on any SQLAlchemy URL.

SQLite (WAL, synchronous=FULL) is the embedded default; PostgreSQL is the scale path. The schema is Alembic's
(`dialogue/schema.py`, revisions in `dialogue/migrations/versions/`), brought up to date before the store opens.
"""

from __future__ import annotations

import json
import math
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from alembic.util import CommandError
from sqlalchemy import Column, Index, Text, event, exists, func, text
from sqlalchemy.engine import Engine
from sqlalchemy.exc import OperationalError, SQLAlchemyError
from sqlmodel import Field, Session, SQLModel, create_engine, delete, select

from dialogue.errors import AlreadyHandled, InvalidInput, NotFound, StoreUnavailable
from dialogue.schema import enable_wal, upgrade
from memory.persona import PersonaRow


PENDING = "pending"
UNANSWERED = frozenset({PENDING, "interrupted", "error", "handoff"})  # turns with no bot reply to show or learn from
DIED = ("interrupted", "error")  # a try that ended without a reply: the process died, or generation failed
# What a finished pending turn writes over its row (the rest was written when the message came in).
OUTCOME_FIELDS = ("reply", "prompt", "sources", "handoff", "model_id", "adapter_version", "prompt_tokens",
                  "completion_tokens", "latency_ms", "ttft_ms", "finish_reason", "guard", "finished_at")


def utcnow() -> datetime:
    return datetime.now(UTC)


def new_id() -> str:
    return uuid.uuid4().hex


class User(SQLModel, table=True):
    __tablename__ = "users"
    id: str = Field(primary_key=True, max_length=128)
    created_at: datetime = Field(default_factory=utcnow)


class Conversation(SQLModel, table=True):
    __tablename__ = "conversations"
    id: str = Field(primary_key=True, max_length=128)
    user_id: str = Field(index=True, max_length=128)
    channel: str = Field(default="api", max_length=32)
    status: str = Field(default="bot", max_length=16)  # "bot" answers; "human" = handed off, the bot stays silent
    created_at: datetime = Field(default_factory=utcnow)
    updated_at: datetime = Field(default_factory=utcnow)


class Turn(SQLModel, table=True):
    """One exchange: what the user said, what was shown back, and exactly what the model saw."""

    __tablename__ = "turns"
    __table_args__ = (Index("ix_turns_conversation_seq", "conversation_id", "seq"),)
    id: str = Field(default_factory=new_id, primary_key=True, max_length=64)
    conversation_id: str = Field(max_length=128)
    user_id: str = Field(index=True, max_length=128)
    seq: int = 0
    channel: str = Field(default="api", max_length=32)
    user_text: str = Field(sa_column=Column(Text, nullable=False))
    reply: str = Field(sa_column=Column(Text, nullable=False))
    prompt: str = Field(default="{}", sa_column=Column(Text, nullable=False))  # JSON of the prompt parts
    sources: str = Field(default="[]", sa_column=Column(Text, nullable=False))  # JSON list of sources
    handoff: bool = False
    model_id: str = Field(default="", max_length=256)
    adapter_version: str | None = Field(default=None, max_length=64)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latency_ms: int = 0
    ttft_ms: int | None = None
    # stop|length|cancelled|agent|handoff; pending while it is generated (the user's message is on disk first),
    # interrupted when the process writing it died, error when generation failed
    finish_reason: str = Field(default="stop", max_length=16)
    reply_to: str | None = Field(default=None, max_length=64)  # agent turns: the turn whose customer message they answer
    guard: str | None = Field(default=None, max_length=32)  # what the degeneration guard did: "echo:regenerated", "repeat:fallback", "late:echo"
    created_at: datetime = Field(default_factory=utcnow)
    finished_at: datetime = Field(default_factory=utcnow)  # while pending: the writer's lease, renewed while it lives

    @property
    def prompt_parts(self) -> dict[str, Any]:
        return json.loads(self.prompt or "{}")


class Rating(SQLModel, table=True):
    """The user's verdict on a turn; one per turn, the latest wins."""

    __tablename__ = "ratings"
    turn_id: str = Field(primary_key=True, max_length=64)
    user_id: str = Field(index=True, max_length=128)
    rating: int  # +1 or -1
    comment: str | None = Field(default=None, sa_column=Column(Text))
    correction: str | None = Field(default=None, sa_column=Column(Text))
    correction_trusted: bool = False  # an admin approved the correction for training (never the rater alone)
    kept_out: bool = False  # an admin kept the rating (its liked or disliked reply) out of the training data
    correction_kept_out: bool = False  # an admin kept the correction out (it waits for no approval)
    reviewed_at: datetime | None = None  # an admin's latest decision on it (approve, keep out, undo)
    created_at: datetime = Field(default_factory=utcnow)


class IntegrationRow(SQLModel, table=True):
    """An API integration (`dialogue/integrations.py`) with its one key (stored as sha256); revoked rows are kept for the record."""

    __tablename__ = "integrations"
    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(max_length=32, index=True)
    namespace: str = Field(max_length=32)
    scopes: str = Field(max_length=64)  # comma-separated, from SCOPES
    key_hash: str = Field(max_length=64, unique=True, index=True)
    created_at: datetime = Field(default_factory=utcnow)
    revoked_at: datetime | None = None
    rate_per_minute: float | None = None  # the key's requests a minute (None: the settings'; 0: no limit)
    user_rate_per_minute: float | None = None  # each of its users' requests a minute, likewise


class InboundEvent(SQLModel, table=True):
    """An update a channel has taken (a Telegram update_id, a webhook delivery): each is handled once."""

    __tablename__ = "inbound_events"
    channel: str = Field(primary_key=True, max_length=32)
    event_id: str = Field(primary_key=True, max_length=128)
    received_at: datetime = Field(default_factory=utcnow)


class MemoryOutbox(SQLModel, table=True):
    """A recorded turn whose after-turn memory write is owed: written with the turn, deleted once done."""

    __tablename__ = "memory_outbox"
    turn_id: str = Field(primary_key=True, max_length=64)
    user_id: str = Field(index=True, max_length=128)
    attempts: int = 0
    last_error: str | None = Field(default=None, sa_column=Column(Text))
    created_at: datetime = Field(default_factory=utcnow)


class Erasure(SQLModel, table=True):
    """A tombstone: the user's erasure has begun and not finished; their requests are refused meanwhile, and
    the job is resumed (by the next sweep or `rapport doctor --repair`) until it is done, then this row goes."""

    __tablename__ = "erasures"
    user_id: str = Field(primary_key=True, max_length=128)
    requested_at: datetime = Field(default_factory=utcnow)


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    enable_wal(dbapi_connection)
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA synchronous=FULL")  # an answered turn survives a crash of the process or the machine
    cursor.execute("PRAGMA busy_timeout=5000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA secure_delete=ON")  # erased rows are zeroed on disk, not left in free pages
    cursor.close()


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"check_same_thread": False})
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=10)


class TranscriptStore:
    """Keyword-only operations on the transcript tables; every user-scoped read takes the user id."""

    def __init__(self, url: str) -> None:
        self.url = url
        try:
            self.applied = upgrade(url)  # the schema first, under the migration lock (dialogue/schema.py)
            self.engine = make_engine(url)
        except SQLAlchemyError as exc:
            raise StoreUnavailable(f"transcript store at {_redact(url)} is unavailable: {exc.__class__.__name__}") from exc
        except CommandError as exc:  # e.g. a database at a revision this version does not know (a newer one)
            raise StoreUnavailable(f"transcript store at {_redact(url)}: schema migration failed: {exc}") from exc

    @contextmanager
    def session(self) -> Iterator[Session]:
        try:
            with Session(self.engine, expire_on_commit=False) as session:
                yield session
        except OperationalError as exc:
            raise StoreUnavailable(f"transcript store is unavailable: {exc.orig}") from exc

    def ping(self) -> bool:
        """Whether the database answers now."""
        try:
            with self.engine.connect() as conn:
                conn.execute(text("SELECT 1"))
            return True
        except SQLAlchemyError:
            return False

    def close(self) -> None:
        self.engine.dispose()

    # -- conversations ------------------------------------------------------------------------

    def ensure_conversation(self, *, conversation_id: str, user_id: str, channel: str) -> Conversation:
        """The conversation, created on first use; it belongs to one user forever.

        Created by upserts (insert unless there), so a new user's first messages arriving at once make one
        user and one conversation, whichever commits first; the others read it."""
        with self.session() as session:
            conversation = session.get(Conversation, conversation_id)
            if conversation is None:
                now = utcnow()
                session.execute(insert_new(self.engine, User, {"id": user_id, "created_at": now}))
                session.execute(insert_new(self.engine, Conversation, {
                    "id": conversation_id, "user_id": user_id, "channel": channel, "status": "bot",
                    "created_at": now, "updated_at": now}))
                session.commit()
                conversation = session.get(Conversation, conversation_id)
            if conversation.user_id != user_id:
                raise InvalidInput("that conversation id belongs to another user")
            return conversation

    def history(self, *, conversation_id: str, user_id: str, limit: int = 20) -> list[Turn]:
        """The last `limit` turns of one of this user's conversations, oldest first."""
        with self.session() as session:
            rows = session.exec(
                select(Turn)
                .where(Turn.conversation_id == conversation_id, Turn.user_id == user_id)
                .order_by(Turn.seq.desc())
                .limit(limit)
            ).all()
        return list(reversed(rows))

    # -- turns and ratings --------------------------------------------------------------------

    def record_turn(self, turn: Turn, *, event: tuple[str, str] | None = None) -> Turn:
        """Write a turn (finished, or pending: the message before its reply) in one transaction; committed (and
        on disk) when this returns. `event` (channel, event id) is claimed in the same transaction: a delivery
        already recorded raises `AlreadyHandled` and writes nothing, as does a turn id already on record."""
        with self.session() as session:
            self._lock_conversation(session, turn.conversation_id)
            if event is not None:
                if not inserted(session, self.engine, InboundEvent, {
                        "channel": event[0], "event_id": event[1], "received_at": utcnow()}):
                    session.rollback()
                    raise AlreadyHandled(f"{event[0]} event {event[1]} was handled before")
            if session.get(Turn, turn.id) is not None:  # a client's message id names its turn (bot/http/turns.py)
                session.rollback()
                raise AlreadyHandled(f"turn {turn.id} is on record")
            last = session.exec(
                select(Turn.seq).where(Turn.conversation_id == turn.conversation_id).order_by(Turn.seq.desc()).limit(1)
            ).first()
            turn.seq = (last or 0) + 1
            conversation = session.get(Conversation, turn.conversation_id)
            if conversation is not None:
                conversation.updated_at = utcnow()
                session.add(conversation)
            session.add(turn)
            session.commit()
            return turn

    def finish_turn(self, turn: Turn, *, owe_memory: bool = False,
                    then: Callable[[Session], None] | None = None) -> bool:
        """Write the outcome over a pending turn's row, and with `owe_memory` its memory write into the outbox
        in the same transaction, as `then(session)` runs (what an answered turn teaches: the persona); False
        (nothing written) when the row is no longer pending: its user was erased, or it was closed as interrupted."""
        from sqlalchemy import update

        with self.session() as session:
            result = session.execute(update(Turn).where(Turn.id == turn.id, Turn.finish_reason == PENDING)
                                     .values({name: getattr(turn, name) for name in OUTCOME_FIELDS}))
            if result.rowcount != 1:
                session.rollback()
                return False
            if owe_memory:
                session.execute(insert_new(self.engine, MemoryOutbox, {
                    "turn_id": turn.id, "user_id": turn.user_id, "attempts": 0, "created_at": utcnow()}))
            if then is not None:
                then(session)
            session.commit()
            return True

    # -- the memory outbox ----------------------------------------------------------------------

    def owed_memory(self, *, limit: int = 100, user_id: str | None = None) -> list[tuple[MemoryOutbox, Turn | None]]:
        """Memory writes still owed, oldest first, with their turns (None: the turn is gone)."""
        with self.session() as session:
            query = select(MemoryOutbox, Turn).join(Turn, Turn.id == MemoryOutbox.turn_id, isouter=True)
            if user_id is not None:
                query = query.where(MemoryOutbox.user_id == user_id)
            return [(row, turn) for row, turn in session.exec(query.order_by(MemoryOutbox.created_at).limit(limit))]

    def memory_written(self, turn_id: str) -> None:
        with self.session() as session:
            session.exec(delete(MemoryOutbox).where(MemoryOutbox.turn_id == turn_id))
            session.commit()

    def owes_memory(self, turn_id: str) -> bool:
        """Whether the turn's memory write is still owed: in the outbox, its user not being erased. From an erasure's
        tombstone on, one of the two says no: the tombstone until the erasure deletes the user's rows (this one
        among them), the missing row after."""
        with self.session() as session:
            erased = exists().where(Erasure.user_id == MemoryOutbox.user_id)
            return session.exec(select(MemoryOutbox.turn_id).where(MemoryOutbox.turn_id == turn_id, ~erased)).first() \
                is not None

    def memory_failed(self, turn_id: str, error: str) -> None:
        from sqlalchemy import update

        with self.session() as session:
            session.execute(update(MemoryOutbox).where(MemoryOutbox.turn_id == turn_id)
                            .values(attempts=MemoryOutbox.attempts + 1, last_error=error[:500]))
            session.commit()

    def turn_ids(self, ids: list[str]) -> set[str]:
        """Which of `ids` are turns on record."""
        found: set[str] = set()
        with self.session() as session:
            for start in range(0, len(ids), 500):
                found |= set(session.exec(select(Turn.id).where(Turn.id.in_(ids[start:start + 500]))).all())
        return found

    def reopen_turn(self, turn_id: str) -> Turn | None:
        """Make a turn whose try died unanswered (interrupted, error) pending again, with a fresh lease, for another
        try of the same message; None when it is not such a turn (gone, being answered, answered)."""
        from sqlalchemy import update

        with self.session() as session:
            result = session.execute(update(Turn).where(Turn.id == turn_id, Turn.finish_reason.in_(DIED))
                                     .values(finish_reason=PENDING, finished_at=utcnow()))
            session.commit()
            return session.get(Turn, turn_id) if result.rowcount == 1 else None

    def discard_pending(self, turn_id: str) -> None:
        """Delete a pending turn whose message was refused (its event, if any, stays claimed)."""
        with self.session() as session:
            session.exec(delete(Turn).where(Turn.id == turn_id, Turn.finish_reason == PENDING))
            session.commit()

    def renew_leases(self, turn_ids: list[str]) -> None:
        """Say that the pending turns `turn_ids` are still being written (their writer is alive)."""
        from sqlalchemy import update

        if not turn_ids:
            return
        with self.session() as session:
            session.execute(update(Turn).where(Turn.id.in_(turn_ids), Turn.finish_reason == PENDING)
                            .values(finished_at=utcnow()))
            session.commit()

    def close_abandoned(self, *, stale_before: datetime, channels: set[str] | None = None,
                        exclude: set[str] = frozenset(), user_id: str | None = None) -> list[Turn]:
        """Close as "interrupted" the pending turns whose lease ended before `stale_before` (their process died),
        in `channels` (None: any) but not in `exclude`, of `user_id` when given; returns the turns this call
        closed, each closed once however many processes sweep at the same time."""
        from sqlalchemy import update

        with self.session() as session:
            query = select(Turn).where(Turn.finish_reason == PENDING, Turn.finished_at < stale_before)
            if channels is not None:
                query = query.where(Turn.channel.in_(sorted(channels)))
            if exclude:
                query = query.where(Turn.channel.not_in(sorted(exclude)))
            if user_id is not None:
                query = query.where(Turn.user_id == user_id)
            closed = []
            for turn in session.exec(query.order_by(Turn.created_at)).all():
                now = utcnow()
                result = session.execute(update(Turn).where(Turn.id == turn.id, Turn.finish_reason == PENDING)
                                         .values(finish_reason="interrupted", finished_at=now))
                if result.rowcount == 1:
                    turn.finish_reason, turn.finished_at = "interrupted", now
                    closed.append(turn)
            session.commit()
            return closed

    def _lock_conversation(self, session: Session, conversation_id: str) -> None:
        """Serialise writers of one conversation until this transaction ends, so each turn gets its own
        sequence number: a row lock on PostgreSQL, the database's write lock on SQLite (BEGIN IMMEDIATE)."""
        if self.engine.dialect.name == "sqlite":
            session.connection().exec_driver_sql("BEGIN IMMEDIATE")
        else:
            session.execute(select(Conversation.id).where(Conversation.id == conversation_id).with_for_update())

    def claim_event(self, *, channel: str, event_id: str) -> bool:
        """True the first time `(channel, event_id)` is seen, False ever after (redeliveries, restarts)."""
        with self.session() as session:
            claimed = inserted(session, self.engine, InboundEvent, {
                "channel": channel, "event_id": event_id, "received_at": utcnow()})
            session.commit()
            return claimed

    def event_claimed(self, *, channel: str, event_id: str) -> bool:
        """Whether `(channel, event_id)` was handled (its turn recorded) before."""
        with self.session() as session:
            return session.get(InboundEvent, (channel, event_id)) is not None

    def set_status(self, *, conversation_id: str, status: str) -> None:
        """Hand a conversation to a human ("human") or back to the bot ("bot")."""
        if status not in ("bot", "human"):
            raise InvalidInput("status is 'bot' or 'human'")
        with self.session() as session:
            conversation = session.get(Conversation, conversation_id)
            if conversation is None:
                raise NotFound(f"no conversation {conversation_id!r}")
            conversation.status = status
            session.add(conversation)
            session.commit()

    def conversation_ids(self, *, user_id: str, prefix: str) -> list[str]:
        """The ids of this user's conversations that start with `prefix` (a channel's numbering)."""
        with self.session() as session:
            return list(session.exec(select(Conversation.id).where(
                Conversation.user_id == user_id, Conversation.id.startswith(prefix, autoescape=True))).all())

    def user_ids(self, *, prefix: str) -> list[str]:
        """The ids of users that start with `prefix` (a channel's scopes of one person, e.g. their groups)."""
        with self.session() as session:
            return list(session.exec(select(User.id).where(User.id.startswith(prefix, autoescape=True))).all())

    def get_conversation(self, conversation_id: str) -> Conversation | None:
        with self.session() as session:
            return session.get(Conversation, conversation_id)

    def get_turn(self, turn_id: str) -> Turn | None:
        with self.session() as session:
            return session.get(Turn, turn_id)

    def rate(self, *, turn_id: str, rating: int, user_id: str | None = None, comment: str | None = None,
             correction: str | None = None, trusted: bool = False) -> Rating:
        """Store the verdict on a turn; `user_id`, when given, must own the turn. A new correction is untrusted for
        training until an admin approves it, unless the operator gives it (`trusted`: `transcripts import`)."""
        if rating not in (1, -1):
            raise InvalidInput("rating must be 1 or -1")
        with self.session() as session:
            turn = session.get(Turn, turn_id)
            if turn is None or (user_id is not None and turn.user_id != user_id):
                raise NotFound(f"no turn {turn_id!r}")
            row = session.get(Rating, turn_id) or Rating(turn_id=turn_id, user_id=turn.user_id, rating=rating)
            row.rating, row.created_at = rating, utcnow()
            if comment is not None:
                row.comment = comment
            if correction is not None and (correction != row.correction or trusted):
                row.correction, row.correction_trusted = correction, trusted  # else trusted only once approved
            session.add(row)
            session.commit()
            return row

    def recent_ratings(self, conversation_id: str, limit: int = 10) -> list[int]:
        """The ratings in one conversation, newest turn first."""
        with self.session() as session:
            return list(session.exec(
                select(Rating.rating).join(Turn, Turn.id == Rating.turn_id)
                .where(Turn.conversation_id == conversation_id).order_by(Turn.seq.desc()).limit(limit)
            ).all())

    # -- whole users --------------------------------------------------------------------------

    def tombstone(self, user_id: str) -> None:
        """Begin an erasure: from this commit on the user's messages are refused (`being_erased`)."""
        with self.session() as session:
            session.execute(insert_new(self.engine, Erasure, {"user_id": user_id, "requested_at": utcnow()}))
            session.commit()

    def being_erased(self, user_id: str) -> bool:
        with self.session() as session:
            return session.get(Erasure, user_id) is not None

    def unfinished_erasures(self) -> list[str]:
        with self.session() as session:
            return list(session.exec(select(Erasure.user_id).order_by(Erasure.requested_at)).all())

    def erasure_done(self, user_id: str) -> None:
        """The last step of an erasure: the tombstone goes too, so nothing about the user is left."""
        with self.session() as session:
            session.exec(delete(Erasure).where(Erasure.user_id == user_id))
            session.commit()

    def export_user(self, user_id: str) -> dict[str, Any]:
        with self.session() as session:
            conversations = session.exec(select(Conversation).where(Conversation.user_id == user_id)).all()
            turns = session.exec(select(Turn).where(Turn.user_id == user_id).order_by(Turn.created_at, Turn.seq)).all()
            ratings = session.exec(select(Rating).where(Rating.user_id == user_id)).all()
        return {
            "conversations": [c.model_dump(mode="json") for c in conversations],
            "turns": [t.model_dump(mode="json") for t in turns],
            "ratings": [r.model_dump(mode="json") for r in ratings],
        }

    def delete_user(self, user_id: str) -> dict[str, int]:
        """Erase every row about the user; returns how many of each kind went."""
        counts = {}
        with self.session() as session:
            for name, model, column in (
                ("ratings", Rating, Rating.user_id),
                ("turns", Turn, Turn.user_id),
                ("conversations", Conversation, Conversation.user_id),
                ("users", User, User.id),
                ("personas", PersonaRow, PersonaRow.user_id),
            ):
                counts[name] = session.exec(delete(model).where(column == user_id)).rowcount
            session.exec(delete(MemoryOutbox).where(MemoryOutbox.user_id == user_id))  # nothing owed to the erased
            session.commit()
        if self.engine.dialect.name == "sqlite":  # fold the WAL back so no copy of the rows stays in it
            with self.engine.connect() as conn:
                conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
        return counts

    # -- reading across users (the operators' console) ------------------------------------------

    def list_conversations(self, *, channel: str | None = None, status: str | None = None,
                           adapter_version: str | None = None, rating: int | None = None, user_id: str | None = None,
                           limit: int = 100) -> list[ConversationSummary]:
        """The latest conversations of every user, newest activity first; `adapter_version=""` is the base model,
        `rating` 1/-1 keeps those with such a rating, 0 those with none."""
        query = select(Conversation)
        if user_id is not None:
            query = query.where(Conversation.user_id == user_id)
        if channel:
            query = query.where(Conversation.channel == channel)
        if status:
            query = query.where(Conversation.status == status)
        if adapter_version is not None:
            served = (Turn.adapter_version.is_(None) if adapter_version == ""
                      else Turn.adapter_version == adapter_version)
            query = query.where(exists().where(Turn.conversation_id == Conversation.id, served))
        if rating is not None:
            rated = exists().where(Rating.turn_id == Turn.id, Turn.conversation_id == Conversation.id,
                                   *([Rating.rating == rating] if rating else []))
            query = query.where(rated if rating else ~rated)
        with self.session() as session:
            conversations = session.exec(query.order_by(Conversation.updated_at.desc()).limit(limit)).all()
            ids = [c.id for c in conversations]
            if not ids:
                return []
            counts = {cid: (n, last) for cid, n, last in session.exec(
                select(Turn.conversation_id, func.count(), func.max(Turn.seq))
                .where(Turn.conversation_id.in_(ids)).group_by(Turn.conversation_id)).all()}
            lasts = {t.conversation_id: t for t in session.exec(select(Turn).where(
                Turn.conversation_id.in_(ids),
                Turn.seq.in_([last for _, last in counts.values()]))).all()
                if counts[t.conversation_id][1] == t.seq}
            votes: dict[tuple[str, int], int] = {(cid, r): n for cid, r, n in session.exec(
                select(Turn.conversation_id, Rating.rating, func.count()).join(Turn, Turn.id == Rating.turn_id)
                .where(Turn.conversation_id.in_(ids)).group_by(Turn.conversation_id, Rating.rating)).all()}
        return [ConversationSummary(conversation=c, turns=counts.get(c.id, (0, 0))[0], last=lasts.get(c.id),
                                    ups=votes.get((c.id, 1), 0), downs=votes.get((c.id, -1), 0))
                for c in conversations]

    def list_users(self, *, contains: str = "", limit: int = 200) -> list[tuple[str, datetime, int]]:
        """(user id, first seen, conversations) of the users whose id contains `contains`, newest first."""
        query = (select(User.id, User.created_at, func.count(Conversation.id))
                 .join(Conversation, Conversation.user_id == User.id, isouter=True).group_by(User.id, User.created_at))
        if contains:
            query = query.where(User.id.contains(contains, autoescape=True))
        with self.session() as session:
            return [tuple(row) for row in session.exec(query.order_by(User.created_at.desc()).limit(limit)).all()]

    def conversation_turns(self, conversation_id: str, *, limit: int = 500) -> list[tuple[Turn, Rating | None]]:
        """Every turn of one conversation with its rating, oldest first (the console's transcript)."""
        with self.session() as session:
            rows = session.exec(
                select(Turn, Rating).join(Rating, Rating.turn_id == Turn.id, isouter=True)
                .where(Turn.conversation_id == conversation_id).order_by(Turn.seq.desc()).limit(limit)).all()
        return [(turn, rating) for turn, rating in reversed(rows)]

    def facets(self) -> dict[str, list[str]]:
        """The channels and adapter versions that occur in the transcripts ("" is the base model)."""
        with self.session() as session:
            channels = session.exec(select(Conversation.channel).distinct()).all()
            versions = session.exec(select(Turn.adapter_version).distinct()).all()
        return {"channels": sorted(channels), "adapter_versions": sorted(v or "" for v in versions)}

    def recent_feedback(self, *, limit: int = 200) -> list[tuple[Rating, Turn]]:
        """Ratings and corrections with the turn they judge, newest first."""
        with self.session() as session:
            return list(session.exec(select(Rating, Turn).join(Turn, Turn.id == Rating.turn_id)
                                     .order_by(Rating.created_at.desc()).limit(limit)).all())

    def variant_outcomes(self, *, since: datetime | None = None, latency_rows: int = 100_000) -> dict[str, dict]:
        """Per adapter version served ("" = base): conversations, live bot turns (not imported ones), ratings up/down,
        corrections, handed-off conversations and the bot turns' latencies in ms (the newest `latency_rows`)."""
        bot_turn = Turn.model_id.notin_(("human", "", "import")) & (Turn.finish_reason != "handoff")  # live bot replies
        when = [Turn.created_at >= since] if since is not None else []
        version = func.coalesce(Turn.adapter_version, "")
        out: dict[str, dict] = {}
        with self.session() as session:
            for v, conversations, turns in session.exec(
                    select(version, func.count(Turn.conversation_id.distinct()), func.count())
                    .where(bot_turn, *when).group_by(version)).all():
                out[v] = {"conversations": conversations, "turns": turns, "up": 0, "down": 0, "corrections": 0,
                          "handoff_conversations": 0, "latencies_ms": []}
            for v, r, n, corrected in session.exec(
                    select(version, Rating.rating, func.count(), func.count(Rating.correction))
                    .join(Rating, Rating.turn_id == Turn.id).where(bot_turn, *when)
                    .group_by(version, Rating.rating)).all():
                if v in out:
                    out[v]["up" if r == 1 else "down"] += n
                    out[v]["corrections"] += corrected
            # a conversation with any handoff counts against every version that served a turn of it
            handed = select(Turn.conversation_id).where(Turn.handoff.is_(True))
            for v, n in session.exec(
                    select(version, func.count(Turn.conversation_id.distinct()))
                    .where(bot_turn, Turn.conversation_id.in_(handed), *when).group_by(version)).all():
                if v in out:
                    out[v]["handoff_conversations"] = n
            for v, ms in session.exec(select(version, Turn.latency_ms).where(bot_turn, *when)
                                      .order_by(Turn.created_at.desc()).limit(latency_rows)).all():
                out[v]["latencies_ms"].append(ms)
        return out

    def activity(self, *, since: datetime, until: datetime | None = None, bucket_s: int = 60,
                 max_rows: int = 200_000) -> list[ActivityBucket]:
        """The bot's live turns since `since` in buckets of `bucket_s` seconds, per adapter version ("" = base):
        turns, handed-off turns, ratings up/down and latency p50/p95; oldest bucket first, the newest `max_rows`."""
        if bucket_s < 1:
            raise InvalidInput("bucket_s is at least 1")
        bot_turn = Turn.model_id.notin_(("human", "", "import"))  # what the bot answered, live (gate rules included)
        when = [Turn.created_at >= since] + ([Turn.created_at < until] if until is not None else [])
        query = (select(Turn.created_at, func.coalesce(Turn.adapter_version, ""), Turn.latency_ms, Turn.handoff,
                        Turn.finish_reason, Rating.rating)
                 .join(Rating, Rating.turn_id == Turn.id, isouter=True).where(bot_turn, *when)
                 .order_by(Turn.created_at.desc()).limit(max_rows))
        with self.session() as session:
            rows = session.exec(query).all()
        origin = _aware(since).timestamp()
        grouped: dict[tuple[int, str], list] = {}
        for created, version, latency_ms, handoff, finish_reason, rating in rows:
            slot = int((_aware(created).timestamp() - origin) // bucket_s)
            grouped.setdefault((slot, version), []).append((latency_ms, handoff, finish_reason, rating))
        out = []
        for (slot, version), items in sorted(grouped.items()):
            generated = sorted(ms for ms, _, reason, _ in items if reason != "handoff")  # gate answers take no time
            out.append(ActivityBucket(
                start=datetime.fromtimestamp(origin + slot * bucket_s, UTC), version=version, turns=len(items),
                handoffs=sum(1 for _, handed, _, _ in items if handed), up=sum(1 for *_, r in items if r == 1),
                down=sum(1 for *_, r in items if r == -1), latency_p50_ms=_quantile(generated, 0.5),
                latency_p95_ms=_quantile(generated, 0.95)))
        return out


@dataclass(frozen=True)
class ActivityBucket:
    """One adapter version's live turns in one time bucket (the console's Monitoring page)."""

    start: datetime  # UTC
    version: str  # "" = the base model
    turns: int
    handoffs: int  # turns that handed the conversation to a person (asked for, or not covered by the FAQ)
    up: int
    down: int
    latency_p50_ms: int | None  # over the generated replies (the handoff gate's fixed answers left out)
    latency_p95_ms: int | None


def _aware(value: datetime) -> datetime:
    """SQLite gives naive datetimes back: they were written as UTC."""
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def _quantile(sorted_ms: list[int], q: float) -> int | None:
    """The nearest-rank quantile of sorted values; None for none."""
    if not sorted_ms:
        return None
    return sorted_ms[min(len(sorted_ms), max(1, math.ceil(q * len(sorted_ms)))) - 1]


@dataclass(frozen=True)
class ConversationSummary:
    """A row of the console's conversation list: the conversation, how long it is, its last turn and its votes."""

    conversation: Conversation
    turns: int
    last: Turn | None
    ups: int
    downs: int

    @property
    def waiting(self) -> bool:
        """A person has the conversation and the customer spoke last (no agent reply since)."""
        return self.conversation.status == "human" and self.last is not None and self.last.model_id != "human"


def insert_new(engine: Engine, model: type[SQLModel], values: dict[str, Any]):
    """INSERT of one row that does nothing when its primary key is taken (SQLite and PostgreSQL)."""
    if engine.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        from sqlalchemy.dialects.sqlite import insert
    return insert(model).values(**values).on_conflict_do_nothing()


def inserted(session: Session, engine: Engine, model: type[SQLModel], values: dict[str, Any]) -> bool:
    """`insert_new` that says whether the row went in. Not by `rowcount`: psycopg's is -1 for an ORM session's
    INSERT … ON CONFLICT, so on PostgreSQL every event claim looked new and a redelivery was answered again."""
    statement = insert_new(engine, model, values).returning(*model.__table__.primary_key.columns)
    return session.execute(statement).first() is not None


def _redact(url: str) -> str:
    """The URL without its password, fit for an error message."""
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return url
