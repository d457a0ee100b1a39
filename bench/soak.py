"""`rapport bench soak`: conversations against two `rapport serve` processes while one is killed now and then.

The documented multi-process setup, for real: a Chroma server (`chroma run` of the installed chromadb) on a
throw-away directory, a PostgreSQL schema of its own, and two `rapport serve` processes on both, each with its
own throw-away RAPPORT_HOME that borrows your converted model and CPU calibration. Each conversation sends a
message tagged with a unique token, waits for the reply, and sends the next; a connection error or a 5xx is
retried against the other process. At random moments one process gets SIGKILL and is started again.

Afterwards every acknowledged turn is looked up in SQL (through the other process's export): missing ones are
lost; a message answered by more than one turn is a duplicate reply; `rapport doctor --json` on the same stores
counts memory/SQL drift. 5xx answers are counted apart when they came while neither process was restarting.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from bench.chat import backend_path, borrow
from bench.serve import free_port, percentile, stop_process, wait_ready
from dialogue.errors import StoreUnavailable
from dialogue.settings import Settings

LOCAL_POSTGRES = "postgresql+psycopg://127.0.0.1:5432/postgres"  # the local server, when no URL is given
ANSWERED = frozenset({"stop", "length"})  # a turn that was answered by the model
FACTS = ["I live in {}.", "My number is {}.", "I bake in {}.", "My cat is {}."]  # short: a tiny model's limit
GRACE_S = 3.0  # after a process is ready again, errors still count as the restart's


def heartbeat(url: str) -> bool:
    for path in ("/api/v2/heartbeat", "/api/v1/heartbeat"):
        try:
            if httpx.get(url + path, timeout=2).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
    return False


@contextmanager
def chroma_server(path: Path) -> Iterator[str]:
    """`chroma run` on a free loopback port over `path`; yields its URL once its heartbeat answers."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    chroma = Path(sys.executable).with_name("chroma")
    log = path.parent / "chroma.log"
    with log.open("ab") as sink:
        process = subprocess.Popen([str(chroma), "run", "--path", str(path), "--host", "127.0.0.1", "--port", str(port)],
                                   stdout=sink, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 60
        while not heartbeat(url):
            if process.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"chroma run did not start: {log.read_text(errors='replace')[-1000:]}")
            time.sleep(0.3)
        yield url
    finally:
        stop_process(process, timeout_s=20)


@contextmanager
def pg_schema(url: str) -> Iterator[str]:
    """A PostgreSQL URL on a schema of its own, dropped afterwards."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.exc import SQLAlchemyError

    schema = f"soak_{uuid.uuid4().hex[:12]}"
    admin = create_engine(url)
    try:
        with admin.begin() as conn:
            conn.execute(text(f"CREATE SCHEMA {schema}"))
    except SQLAlchemyError as exc:
        admin.dispose()
        raise StoreUnavailable(f"bench soak needs a PostgreSQL it can make a schema in ({exc.__class__.__name__} "
                               f"at {url.split('@')[-1]}): pass --database-url postgresql+psycopg://…") from exc
    try:
        separator = "&" if "?" in url else "?"
        yield f"{url}{separator}options=-csearch_path%3D{schema}"
    finally:
        with admin.begin() as conn:
            conn.execute(text(f"DROP SCHEMA IF EXISTS {schema} CASCADE"))
        admin.dispose()


class ServeProcess:
    """One `rapport serve` on its own home and port; can be killed (SIGKILL) and started again."""

    def __init__(self, home: Path, env: dict[str, str]) -> None:
        self.home, self.port = home, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = env
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        log = self.home / "serve.log"
        with log.open("ab") as sink:
            self.process = subprocess.Popen([sys.executable, "-m", "bot.cli", "serve", "--port", str(self.port),
                                             "--log-level", "warning"], env={**self.env, "RAPPORT_HOME": str(self.home)},
                                            stdout=subprocess.DEVNULL, stderr=sink)
        wait_ready(self.process, self.url, log)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            stop_process(self.process)


@dataclass
class Cluster:
    """Two serving processes on one PostgreSQL schema and one Chroma server, and the key both accept."""

    processes: list[ServeProcess]
    headers: dict[str, str]
    env: dict[str, str]


@contextmanager
def cluster(settings: Settings, pg_url: str, **extra_env: str) -> Iterator[Cluster]:
    """Chroma server + PostgreSQL schema + two `rapport serve` processes; everything thrown away after."""
    root = Path(tempfile.mkdtemp(prefix="rapport-bench-soak-"))
    key = "bench-" + secrets.token_urlsafe(24)
    try:
        with chroma_server(root / "chroma") as chroma_url, pg_schema(pg_url) as db_url:
            env = {**os.environ, "RAPPORT_DATABASE_URL": db_url, "RAPPORT_CHROMA_URL": chroma_url,
                   "RAPPORT_API_RATE_PER_MINUTE": "0", "RAPPORT_API_USER_RATE_PER_MINUTE": "0",
                   "RAPPORT_API_KEYS": "", "RAPPORT_ADMIN_KEYS": key, **extra_env}
            processes = []
            for name in ("a", "b"):
                home = root / name
                home.mkdir()
                borrow(home, settings)
                processes.append(ServeProcess(home, env))
            try:
                for process in processes:  # one after the other: the first one migrates the schema
                    process.start()
                yield Cluster(processes, {"Authorization": f"Bearer {key}"}, env)
            finally:
                for process in processes:
                    process.stop()
    finally:
        shutil.rmtree(root, ignore_errors=True)


@dataclass
class Tally:
    acknowledged: dict[str, str] = field(default_factory=dict)  # turn id → the message's token
    attempts: Counter = field(default_factory=Counter)  # token → requests sent with it
    sent: dict[str, str] = field(default_factory=dict)  # token → user id
    turn_s: list[float] = field(default_factory=list)
    errors_in_restart: int = 0
    errors_outside: list[str] = field(default_factory=list)
    retries: int = 0
    waits: int = 0  # retries told that the message's first try was still being answered
    restarts: list[tuple[float, float]] = field(default_factory=list)  # (killed at, ready again at + grace)
    restarting: float | None = None  # when the current restart began

    def in_restart(self, began: float, ended: float) -> bool:
        windows = self.restarts + ([(self.restarting, float("inf"))] if self.restarting is not None else [])
        return any(began <= stop and ended >= start for start, stop in windows)


async def send(clients: list[httpx.AsyncClient], first: int, conversation: str, user: str, text: str, token: str,
               tally: Tally, deadline: float) -> None:
    """One message until some process acknowledges it (or the run is long over): the first process, then the other."""
    tally.sent[token] = user
    attempt = 0
    started = time.monotonic()
    while time.monotonic() < deadline + 120:
        client = clients[(first + attempt) % len(clients)]
        began = time.monotonic()
        tally.attempts[token] += 1
        try:
            response = await client.post(f"/v1/conversations/{conversation}/messages",  # one id for every try
                                         json={"user_id": user, "text": text, "message_id": token})
            status, detail = response.status_code, response.text[:160]
        except httpx.HTTPError as exc:
            status, detail = 0, exc.__class__.__name__
        if status == 200:
            tally.acknowledged[response.json()["turn_id"]] = token
            tally.turn_s.append(time.monotonic() - started)
            return
        if status and status < 500 and status != 429:
            tally.errors_outside.append(f"HTTP {status}: {detail}")  # a client error is nobody's restart
            return
        if status == 503 and "still being answered" in detail:  # its first try is under way: wait for it
            tally.waits += 1
        elif tally.in_restart(began, time.monotonic()):
            tally.errors_in_restart += 1
        else:
            tally.errors_outside.append(f"HTTP {status}: {detail}" if status else detail)
        attempt += 1
        tally.retries += 1
        await asyncio.sleep(0.5)


async def conversation_loop(clients, index: int, deadline: float, tally: Tally, run_id: str) -> None:
    user, conversation = f"soak-{run_id}-u{index}", f"soak-{run_id}-c{index}"
    turn = 0
    while time.monotonic() < deadline:
        token = f"s{index}m{turn}"
        await send(clients, index, conversation, user, f"{FACTS[turn % len(FACTS)].format(token)} [{token}]", token,
                   tally, deadline)
        turn += 1


async def killer(c: Cluster, deadline: float, tally: Tally, rng: random.Random, every_s: tuple[float, float]) -> None:
    """SIGKILL one process at a random moment, start it again at once; until the time is up."""
    while True:
        await asyncio.sleep(rng.uniform(*every_s))
        if time.monotonic() >= deadline:
            return
        victim = rng.choice(c.processes)
        tally.restarting = time.monotonic()
        victim.kill()
        await asyncio.to_thread(victim.start)
        tally.restarts.append((tally.restarting, time.monotonic() + GRACE_S))
        tally.restarting = None


async def drive(c: Cluster, conversations: int, duration_s: float, seed: int) -> Tally:
    tally, rng = Tally(), random.Random(seed)
    run_id = uuid.uuid4().hex[:6]
    deadline = time.monotonic() + duration_s
    every = (duration_s / 4, duration_s / 2) if duration_s < 240 else (30.0, 90.0)
    limits = httpx.Limits(max_connections=conversations + 4)
    clients = [httpx.AsyncClient(base_url=p.url, headers=c.headers, timeout=httpx.Timeout(300.0), limits=limits)
               for p in c.processes]
    try:
        kills = asyncio.create_task(killer(c, deadline, tally, rng, every))
        await asyncio.gather(*(conversation_loop(clients, i, deadline, tally, run_id) for i in range(conversations)))
        await kills
    finally:
        for client in clients:
            await client.aclose()
    return tally


def check(c: Cluster, tally: Tally) -> dict:
    """Every acknowledged turn looked up in SQL; messages answered twice; the doctor's drift count."""
    turns = []
    with httpx.Client(base_url=c.processes[0].url, headers=c.headers, timeout=60) as client:
        for user in sorted(set(tally.sent.values())):
            response = client.get(f"/v1/users/{user}/export")
            response.raise_for_status()
            turns += response.json()["turns"]
    on_record = {t["id"]: t for t in turns}
    lost = [turn_id for turn_id in tally.acknowledged if turn_id not in on_record
            or on_record[turn_id]["finish_reason"] not in ANSWERED]
    answers: dict[str, list[str]] = {}
    for t in turns:
        token = t["user_text"].rsplit("[", 1)[-1].rstrip("]")
        if t["finish_reason"] in ANSWERED and token in tally.sent:
            answers.setdefault(token, []).append(t["id"])
    # A message answered more than once is a duplicate: every try carries the message's id, so a retry after a lost
    # response gets the first answer back (`message_id` in the native API).
    duplicates = [token for token, ids in answers.items() if len(ids) > 1]
    doctor = subprocess.run([sys.executable, "-m", "bot.cli", "doctor", "--json"], capture_output=True, text=True,
                            env={**c.env, "RAPPORT_HOME": str(c.processes[0].home)}, timeout=600)
    try:
        drift = json.loads(doctor.stdout)
    except ValueError:
        raise RuntimeError(f"rapport doctor failed: {doctor.stderr[-1000:]}") from None
    return {"lost": lost, "duplicates": sorted(duplicates),
            "interrupted": sum(t["finish_reason"] == "interrupted" for t in turns), "doctor": drift}


def run(settings: Settings, *, pg_url: str, conversations: int = 16, minutes: float = 10.0, seed: int = 0,
        lease_s: float = 5.0) -> dict:
    """Start the two-process setup, drive and kill it for `minutes`, check it; the JSON-able report."""
    with cluster(settings, pg_url, RAPPORT_TURN_LEASE_S=str(lease_s)) as c:
        started = time.monotonic()
        tally = asyncio.run(drive(c, conversations, minutes * 60, seed))
        wall_s = time.monotonic() - started
        time.sleep(lease_s * 2)  # the killed processes' pending turns: their leases run out and are closed
        found = check(c, tally)
        path = backend_path(settings.model_copy(update={"home": c.processes[0].home}))
        logged = [line for p in c.processes for line in (p.home / "serve.log").read_text(errors="replace").splitlines()
                  if "Error" in line or "ERROR" in line]
    doctor = found["doctor"]
    return {
        "model": settings.model or "embedded SmolLM2-135M-Instruct", "path": path, "conversations": conversations,
        "minutes": minutes, "wall_s": round(wall_s, 1), "restarts": len(tally.restarts),
        "acknowledged": len(tally.acknowledged), "lost": len(found["lost"]),
        "lost_samples": found["lost"][:5], "duplicates": len(found["duplicates"]),
        "duplicate_samples": found["duplicates"][:5], "waited_for_a_first_try": tally.waits,
        "turns_interrupted": found["interrupted"],
        "retries": tally.retries, "errors_during_restarts": tally.errors_in_restart,
        "server_errors": sum(e.startswith("HTTP 5") for e in tally.errors_outside),  # 5xx outside restarts
        "other_errors_outside_restarts": sum(not e.startswith("HTTP 5") for e in tally.errors_outside),
        "error_samples": sorted(set(tally.errors_outside), key=lambda e: not e.startswith("HTTP 5"))[:5],
        "server_error_lines": logged[-8:],
        "drift": doctor["drift"], "drift_by_kind": {k: len(v) for k, v in doctor.items() if isinstance(v, list)},
        "turn_p50_s": percentile(tally.turn_s, 0.5), "turn_p95_s": percentile(tally.turn_s, 0.95),
    }
