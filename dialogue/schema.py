"""Schema migrations with Alembic: `upgrade(url)` brings the transcript database to the newest revision.

`rapport db upgrade` runs it, and so does every process at start (`TranscriptStore`). The revisions live in
`dialogue/migrations/versions/` (shipped as package data) and are written in batch mode, so SQLite's limited
ALTER TABLE is worked around by copying the table. Processes starting together take turns: on PostgreSQL the
migration's transaction holds an advisory lock, on SQLite it is a `BEGIN EXCLUSIVE` transaction (DDL included,
so a failed step leaves nothing half done). The next one then finds the database at the head and does nothing.

A database made by the hand-written migration list that came before (its table `schema_migrations`) is
recognised: it is stamped at the revision of its last step, then upgraded from there.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, event, inspect, text
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.pool import NullPool

MIGRATIONS = Path(__file__).with_name("migrations")
# The hand-written steps of earlier versions, each the same schema change as the revision it maps to.
LEGACY = {"0001_initial": "0001", "0002_handoff_events_personas": "0002", "0003_turn_guard": "0003"}
LOCK_WAIT_S = 120  # how long a process waits for another's migration (SQLite busy timeout)


def alembic_config(connection: Connection | None = None, *, script_location: Path = MIGRATIONS) -> Config:
    config = Config()
    config.set_main_option("script_location", str(script_location))
    config.attributes["connection"] = connection
    return config


def head(script_location: Path = MIGRATIONS) -> str:
    return ScriptDirectory.from_config(alembic_config(script_location=script_location)).get_current_head()


def current(engine: Engine) -> str | None:
    """The revision the database is at (None: empty, or made before Alembic)."""
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def upgrade(url: str, *, script_location: Path = MIGRATIONS) -> list[str]:
    """Apply the revisions this database has not seen, under the lock; returns their ids, oldest first."""
    engine = migration_engine(url)
    applied: list[str] = []
    try:
        with engine.begin() as conn:
            if conn.dialect.name == "postgresql":  # held until this transaction ends; per database and schema
                conn.execute(text("SELECT pg_advisory_xact_lock(hashtext(current_database() || '.' || "
                                  "current_schema() || '.rapport-schema'))"))
            adopt_legacy(conn, script_location)
            config = alembic_config(conn, script_location=script_location)
            config.attributes["applied"] = applied
            command.upgrade(config, "head")
    finally:
        engine.dispose()
    return applied


def adopt_legacy(conn: Connection, script_location: Path = MIGRATIONS) -> str | None:
    """Stamp a database of the hand-written list at the revision of its last step; returns that revision."""
    tables = set(inspect(conn).get_table_names())
    if "alembic_version" in tables or "schema_migrations" not in tables:
        return None
    done = set(conn.execute(text("SELECT name FROM schema_migrations")).scalars())
    revision = None
    for name, rev in LEGACY.items():  # the steps always ran in order, each once
        if name not in done:
            break
        revision = rev
    if revision is not None:
        command.stamp(alembic_config(conn, script_location=script_location), revision)
    conn.execute(text("DROP TABLE schema_migrations"))
    return revision


def enable_wal(dbapi_connection: sqlite3.Connection, wait_s: float = LOCK_WAIT_S) -> None:
    """PRAGMA journal_mode=WAL, tried again while another connection holds the lock it needs.

    SQLite answers this pragma's lock conflict at once with "database is locked", without waiting the busy
    timeout: four processes opening a new database together failed so in 18 of 120 starts here (once in CI).
    """
    deadline = time.monotonic() + wait_s
    while True:
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if not ("locked" in str(exc) or "busy" in str(exc)) or time.monotonic() >= deadline:
                raise
        finally:
            cursor.close()
        time.sleep(0.01)


def migration_engine(url: str) -> Engine:
    """An engine for one migration: on SQLite its transactions are BEGIN EXCLUSIVE, DDL included."""
    if not url.startswith("sqlite"):
        return create_engine(url, poolclass=NullPool)
    path = url.split("///", 1)[-1]
    if path and path != ":memory:":
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, poolclass=NullPool, connect_args={"timeout": LOCK_WAIT_S})

    @event.listens_for(engine, "connect")
    def _connect(dbapi_connection, _record) -> None:
        dbapi_connection.isolation_level = None  # the driver's own transaction handling off: we say BEGIN
        enable_wal(dbapi_connection)
        cursor = dbapi_connection.cursor()
        cursor.execute(f"PRAGMA busy_timeout={LOCK_WAIT_S * 1000}")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _begin(conn: Connection) -> None:
        conn.exec_driver_sql("BEGIN EXCLUSIVE")

    return engine
