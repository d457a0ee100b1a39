"""`rapport chat` end to end on the real embedded SmolLM2, driven through piped stdin in a subprocess."""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e
RAPPORT = [sys.executable, "-m", "bot.cli"]


def run_chat(home: Path, stdin: bytes, *args: str, env_extra: dict | None = None, timeout: int = 240):
    env = {**os.environ, "RAPPORT_HOME": str(home), "RAPPORT_TEMPERATURE": "0", "RAPPORT_MAX_NEW_TOKENS": "48",
           **(env_extra or {})}
    return subprocess.run([*RAPPORT, "chat", *args], input=stdin, capture_output=True, env=env, timeout=timeout)


def turns(home: Path) -> list[tuple[str, str, str]]:
    with sqlite3.connect(home / "rapport.db") as db:
        return db.execute("SELECT user_id, user_text, reply FROM turns ORDER BY created_at").fetchall()


def test_two_piped_messages_get_two_replies(real_home):
    done = run_chat(real_home, b"Hello!\nCan you help me plan a trip?\n", "--user", "t1")
    assert done.returncode == 0, done.stderr.decode()
    assert b"Traceback" not in done.stderr
    recorded = turns(real_home)
    assert [(u, q) for u, q, _ in recorded] == [("t1", "Hello!"), ("t1", "Can you help me plan a trip?")]
    assert all(reply.strip() for _, _, reply in recorded)
    out = done.stdout.decode()
    for _, _, reply in recorded:
        assert reply.strip() in out


def test_hostile_stdin_is_neutralised(real_home):
    stdin = b"\n\n   \n\xff\xfe bad bytes\n\x1b[2J\x1b]0;pwned\x07hello\x00 there\n/rate sideways\n/nonsense\n"
    done = run_chat(real_home, stdin, "--user", "t2")
    assert done.returncode == 0, done.stderr.decode()
    assert b"\x1b" not in done.stdout and b"\x00" not in done.stdout and b"Traceback" not in done.stderr
    assert b"Usage: /rate up|down" in done.stdout and b"Unknown command /nonsense" in done.stdout
    said = [q for _, q, _ in turns(real_home)]
    assert said == ["\ufffd\ufffd bad bytes", "[2J]0;pwnedhello there"]


def test_an_answered_turn_survives_sigkill(real_home):
    env = {**os.environ, "RAPPORT_HOME": str(real_home), "RAPPORT_TEMPERATURE": "0", "RAPPORT_MAX_NEW_TOKENS": "32"}
    proc = subprocess.Popen([*RAPPORT, "chat", "--user", "k1"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, env=env)
    proc.stdin.write(b"Hello!\n/help\n")  # /help prints only after the reply before it is complete
    proc.stdin.flush()
    shown = b""
    deadline = time.monotonic() + 180
    while b"Commands:" not in shown and time.monotonic() < deadline:
        shown += os.read(proc.stdout.fileno(), 4096)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    reply_shown = shown.split(b"Commands:")[0].decode().strip()
    assert reply_shown
    assert [(u, r.strip()) for u, _, r in turns(real_home)] == [("k1", reply_shown)]


def test_a_wrong_model_setting_fails_in_one_line(home):
    done = run_chat(home, b"hi\n", env_extra={"RAPPORT_MODEL": "/nonexistent/model"}, timeout=60)
    assert done.returncode != 0
    err = done.stderr.decode().strip()
    assert len(err.splitlines()) == 1 and "/nonexistent/model" in err, err


def test_a_corrupt_model_cache_is_rebuilt(home, real_models_dir):
    cache = home / "models" / "smollm2-135m-instruct"
    shutil.copytree(real_models_dir / "smollm2-135m-instruct", cache)
    with open(cache / "model.safetensors", "r+b") as f:
        f.truncate(1000)
    done = run_chat(home, b"Hello!\n", "--user", "t3")
    assert done.returncode == 0, done.stderr.decode()
    assert b"rebuilding" in done.stderr
    assert (cache / "model.safetensors").stat().st_size > 100_000_000
    assert turns(home)[0][2].strip()
