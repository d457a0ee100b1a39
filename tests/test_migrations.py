"""Schema migrations (Alembic) on SQLite and PostgreSQL: from an empty database, from the schema the hand-written
migration list made, in batch mode, atomically, and with processes starting together."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from datetime import UTC, datetime

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import create_engine, inspect, text
from sqlmodel import SQLModel

from conftest import REPO
from dialogue import schema
from dialogue.errors import StoreUnavailable
from dialogue.store import Conversation, InboundEvent, Rating, TranscriptStore, Turn, User
from memory.persona import PersonaRow, PersonaStore

ALL = ["0001", "0002", "0003", "0004", "0005", "0006", "0007"]
HEAD = ALL[-1]


def drift(engine) -> list:
    """What differs between the database and the models (tables, columns, types, indexes); [] when they agree."""
    with engine.connect() as conn:
        return compare_metadata(MigrationContext.configure(conn), SQLModel.metadata)


def tables(url: str) -> set[str]:
    engine = create_engine(url)
    try:
        return set(inspect(engine).get_table_names())
    finally:
        engine.dispose()


def test_an_empty_database_is_built_to_the_models_once(db_url):
    store = TranscriptStore(db_url)
    try:
        assert store.applied == ALL
        assert schema.current(store.engine) == schema.head() == HEAD
        assert drift(store.engine) == []
    finally:
        store.close()
    again = TranscriptStore(db_url)
    assert again.applied == []
    again.close()


# -- databases made before Alembic ---------------------------------------------------------------------


def legacy_database(url: str, steps: int) -> None:
    """A database as the hand-written migration list left it after `steps` of its three steps, with rows.

    Its first step was `create_all` of the models of the day, so today's models make today's columns; a database
    that stopped at step 2 is that without step 3's column (`turns.guard`)."""
    engine = create_engine(url)
    now = datetime.now(UTC)
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE schema_migrations (name VARCHAR(128) NOT NULL PRIMARY KEY, "
                          "applied_at TIMESTAMP WITH TIME ZONE NOT NULL)"))
        SQLModel.metadata.create_all(conn, tables=[User.__table__, Conversation.__table__, Turn.__table__,
                                                   Rating.__table__, InboundEvent.__table__, PersonaRow.__table__])
        for column in ("correction_trusted", "kept_out", "correction_kept_out", "reviewed_at"):  # 0004's and 0006's
            conn.execute(text(f"ALTER TABLE ratings DROP COLUMN {column}"))
        if steps < 3:
            conn.execute(text("ALTER TABLE turns DROP COLUMN guard"))
        for name in list(schema.LEGACY)[:steps]:
            conn.execute(text("INSERT INTO schema_migrations (name, applied_at) VALUES (:n, :t)"), {"n": name, "t": now})
        conn.execute(text("INSERT INTO users (id, created_at) VALUES ('u1', :t)"), {"t": now})
        conn.execute(text("INSERT INTO conversations (id, user_id, channel, status, created_at, updated_at) "
                          "VALUES ('c1', 'u1', 'telegram', 'human', :t, :t)"), {"t": now})
        conn.execute(text(
            "INSERT INTO turns (id, conversation_id, user_id, seq, channel, user_text, reply, prompt, sources, handoff,"
            " model_id, prompt_tokens, completion_tokens, latency_ms, finish_reason, reply_to, created_at, finished_at)"
            " VALUES ('t1', 'c1', 'u1', 1, 'telegram', 'I live in Porto', 'Nice!', '{}', '[]', false, 'm', 3, 2, 10,"
            " 'stop', NULL, :t, :t)"), {"t": now})
        conn.execute(text("INSERT INTO ratings (turn_id, user_id, rating, comment, created_at) "
                          "VALUES ('t1', 'u1', -1, 'meh', :t)"), {"t": now})
        conn.execute(text("INSERT INTO personas (user_id, data, updated_at) VALUES ('u1', '{\"name\": \"Lena\"}', :t)"),
                     {"t": now})
        conn.execute(text("INSERT INTO inbound_events (channel, event_id, received_at) VALUES ('telegram', '77', :t)"),
                     {"t": now})
    engine.dispose()


@pytest.mark.parametrize("steps, applied", [(3, ALL[3:]), (2, ALL[2:])])
def test_a_database_of_the_hand_written_list_is_stamped_then_upgraded_with_its_rows(db_url, steps, applied):
    legacy_database(db_url, steps)
    store = TranscriptStore(db_url)
    try:
        assert store.applied == applied  # the steps it had are recognised, not run again (0004 came after the list)
        assert schema.current(store.engine) == schema.head()
        assert drift(store.engine) == [] and "schema_migrations" not in tables(db_url)
        [turn] = store.history(conversation_id="c1", user_id="u1")
        assert (turn.user_text, turn.reply, turn.guard) == ("I live in Porto", "Nice!", None)
        assert store.get_conversation("c1").status == "human" and store.recent_ratings("c1") == [-1]
        assert PersonaStore(store.engine).get("u1").name == "Lena"
        assert store.claim_event(channel="telegram", event_id="77") is False
        store.ensure_conversation(conversation_id="c1", user_id="u1", channel="telegram")
        store.record_turn(Turn(conversation_id="c1", user_id="u1", channel="telegram", user_text="again", reply="ok",
                               guard="echo:regenerated"))
        assert [t.guard for t in store.history(conversation_id="c1", user_id="u1")] == [None, "echo:regenerated"]
    finally:
        store.close()


def test_0006_gives_existing_ratings_an_open_review(db_url):
    """A database at 0005 with a rated turn whose correction was approved: 0006 keeps the row and keeps nothing out."""
    from alembic import command

    engine = schema.migration_engine(db_url)
    now = datetime.now(UTC)
    with engine.begin() as conn:
        command.upgrade(schema.alembic_config(conn), "0005")
        conn.execute(text("INSERT INTO conversations (id, user_id, channel, status, created_at, updated_at) "
                          "VALUES ('c1', 'u1', 'api', 'bot', :t, :t)"), {"t": now})
        conn.execute(text(
            "INSERT INTO turns (id, conversation_id, user_id, seq, channel, user_text, reply, prompt, sources, handoff,"
            " model_id, prompt_tokens, completion_tokens, latency_ms, finish_reason, created_at, finished_at)"
            " VALUES ('t1', 'c1', 'u1', 1, 'api', 'open?', 'no', '{}', '[]', false, 'm', 3, 2, 10, 'stop', :t, :t)"),
            {"t": now})
        conn.execute(text("INSERT INTO ratings (turn_id, user_id, rating, correction, correction_trusted, created_at) "
                          "VALUES ('t1', 'u1', -1, 'Yes, at nine.', true, :t)"), {"t": now})
    engine.dispose()
    store = TranscriptStore(db_url)
    try:
        assert store.applied == ["0006", "0007"] and drift(store.engine) == []
        with store.session() as session:
            rating = session.get(Rating, "t1")
        assert (rating.rating, rating.correction, rating.correction_trusted) == (-1, "Yes, at nine.", True)
        assert (rating.kept_out, rating.correction_kept_out, rating.reviewed_at) == (False, False, None)
    finally:
        store.close()


# -- writing new revisions ---------------------------------------------------------------------------------

WIDEN = '''
import sqlalchemy as sa
from alembic import op

revision = "9999"
down_revision = "{head}"
branch_labels = None
depends_on = None


def upgrade():
    with op.batch_alter_table("turns") as batch:  # SQLite cannot ALTER a column's type: the table is copied
        batch.alter_column("channel", type_=sa.String(64), existing_type=sa.String(32), existing_nullable=False)
        batch.add_column(sa.Column("flagged", sa.Boolean, nullable=False, server_default=sa.false()))
    {fail}
'''


def with_revision(tmp_path, fail: bool = False):
    location = tmp_path / "migrations"
    shutil.copytree(schema.MIGRATIONS, location, ignore=shutil.ignore_patterns("__pycache__"))
    (location / "versions" / "9999_widen.py").write_text(
        WIDEN.replace("{fail}", 'raise RuntimeError("step failed")' if fail else "pass").replace("{head}", HEAD))
    return location


def columns(url: str) -> dict[str, str]:
    engine = create_engine(url)
    try:
        return {c["name"]: str(c["type"]) for c in inspect(engine).get_columns("turns")}
    finally:
        engine.dispose()


def test_a_batch_revision_changes_a_column_keeps_rows_and_indexes(db_url, tmp_path):
    store = TranscriptStore(db_url)
    store.ensure_conversation(conversation_id="c1", user_id="u1", channel="test")
    store.record_turn(Turn(conversation_id="c1", user_id="u1", channel="test", user_text="hi", reply="hello"))
    store.close()
    assert schema.upgrade(db_url, script_location=with_revision(tmp_path)) == ["9999"]
    assert columns(db_url)["channel"] == "VARCHAR(64)" and "flagged" in columns(db_url)
    engine = create_engine(db_url)
    with engine.connect() as conn:
        assert conn.execute(text("SELECT user_text, flagged FROM turns")).all() == [("hi", False)]
    assert {i["name"] for i in inspect(engine).get_indexes("turns")} >= {"ix_turns_user_id", "ix_turns_conversation_seq"}
    engine.dispose()
    with pytest.raises(StoreUnavailable, match="schema migration failed"):  # a newer version's database
        TranscriptStore(db_url)


def test_a_failing_revision_leaves_nothing_half_done(db_url, tmp_path):
    TranscriptStore(db_url).close()
    with pytest.raises(RuntimeError, match="step failed"):
        schema.upgrade(db_url, script_location=with_revision(tmp_path, fail=True))
    assert "flagged" not in columns(db_url) and columns(db_url)["channel"] == "VARCHAR(32)"
    assert not [name for name in tables(db_url) if name.startswith("_alembic")]  # no copy left behind
    store = TranscriptStore(db_url)
    assert schema.current(store.engine) == HEAD
    store.close()


# -- processes starting together ---------------------------------------------------------------------------

STARTER = """
import pathlib, sys, time
from dialogue.store import TranscriptStore
print("ready", flush=True)
go = pathlib.Path(sys.argv[2])
while not go.exists():
    time.sleep(0.001)
print(",".join(TranscriptStore(sys.argv[1]).applied), flush=True)
"""


@pytest.mark.timeout(180)
def test_processes_starting_together_migrate_once(db_url, tmp_path):
    go = tmp_path / "go"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen([sys.executable, "-c", STARTER, db_url, str(go)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env, cwd=REPO) for _ in range(4)]
    try:
        for proc in procs:
            assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
        go.touch()  # all four are past their imports: they open the store within a millisecond of each other
        results = [proc.communicate(timeout=120) for proc in procs]
    finally:
        for proc in procs:
            proc.kill()
    assert [proc.returncode for proc in procs] == [0] * 4, [err[-1500:] for _, err in results]
    assert sorted(out.strip() for out, _ in results) == ["", "", "", ",".join(ALL)]
    store = TranscriptStore(db_url)
    with store.engine.connect() as conn:
        assert conn.execute(text("SELECT version_num FROM alembic_version")).scalars().all() == [HEAD]
    store.close()


WAL_STARTER = """
import pathlib, sqlite3, sys, time
from dialogue.schema import enable_wal
print("ready", flush=True)
go = pathlib.Path(sys.argv[2])
while not go.exists():
    time.sleep(0.0005)
connection = sqlite3.connect(sys.argv[1], timeout=60)
enable_wal(connection)
print(connection.execute("PRAGMA journal_mode").fetchone()[0], flush=True)
"""


@pytest.mark.timeout(180)
def test_processes_opening_a_new_sqlite_database_together_all_get_wal(tmp_path):
    # SQLite refuses the WAL pragma at once while another connection holds its lock (no busy wait): a plain
    # pragma failed 18 of 120 process starts like these; each must wait its turn instead.
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for round_ in range(8):
        db, go = tmp_path / f"r{round_}.db", tmp_path / f"go{round_}"
        procs = [subprocess.Popen([sys.executable, "-c", WAL_STARTER, str(db), str(go)], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True, env=env) for _ in range(4)]
        for proc in procs:
            assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
        go.touch()  # all four are past their imports: they open the database within a millisecond of each other
        results = [proc.communicate(timeout=60) for proc in procs]
        assert [out.strip() for out, _ in results] == ["wal"] * 4, [err[-500:] for _, err in results]


# -- the command -------------------------------------------------------------------------------------------


def test_rapport_db_upgrade_applies_then_says_up_to_date(home):
    from click.testing import CliRunner

    from bot.cli.main import cli

    runner = CliRunner()
    first = runner.invoke(cli, ["db", "upgrade", "--json"])
    assert first.exit_code == 0, first.output
    assert json.loads(first.stdout) == {"applied": ALL, "revision": HEAD}
    again = runner.invoke(cli, ["db", "upgrade"])
    assert again.exit_code == 0 and again.stdout.strip() == f"the database is up to date (revision {HEAD})"
    assert (home / "rapport.db").exists()
