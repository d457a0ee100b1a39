"""`rapport bench serve`: many conversations at once against a real `rapport serve` on 127.0.0.1.

The server runs as a subprocess on a throw-away RAPPORT_HOME (the bench's turns never reach your
transcripts) that borrows the converted model from your home. Each conversation sends a message,
streams the reply (SSE), and sends the next one at once, until the time is up; turns in flight then
finish and count. Reported: turns, errors, throughput, turn latency and time to first token (p50/p95).
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from dialogue.settings import Settings

MESSAGES = [
    "Hello! Can you help me plan a weekend trip?",
    "What should I pack for two days of rain?",
    "Do you know a good way to keep my bike from rusting?",
    "Can you summarise what we talked about so far?",
    "Thanks! One more question: how early should I leave?",
    "My name is Sam and I like hiking.",
]


@dataclass
class Tally:
    turn_s: list[float] = field(default_factory=list)
    ttft_s: list[float] = field(default_factory=list)
    completion_tokens: int = 0
    errors: list[str] = field(default_factory=list)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))], 3)


async def one_turn(client: httpx.AsyncClient, conversation: str, user: str, text: str, tally: Tally) -> None:
    started, first = time.perf_counter(), None
    try:
        async with client.stream("POST", f"/v1/conversations/{conversation}/messages",
                                 json={"user_id": user, "text": text, "stream": True}) as response:
            if response.status_code != 200:
                tally.errors.append(f"HTTP {response.status_code}")
                return
            event = None
            async for line in response.aiter_lines():
                if line.startswith("event: "):
                    event = line[7:]
                elif line.startswith("data: "):
                    if event == "delta" and first is None:
                        first = time.perf_counter()
                    elif event == "error":
                        tally.errors.append(line[6:][:200])
                        return
                    elif event == "done":
                        tally.completion_tokens += json.loads(line[6:])["usage"].get("completion_tokens", 0)
    except httpx.HTTPError as exc:
        tally.errors.append(exc.__class__.__name__)
        return
    end = time.perf_counter()
    tally.turn_s.append(end - started)
    tally.ttft_s.append((first or end) - started)


async def conversation_loop(client: httpx.AsyncClient, index: int, deadline: float, tally: Tally) -> None:
    turn = 0
    while time.perf_counter() < deadline:
        await one_turn(client, f"bench-{index}", f"bench-user-{index}", MESSAGES[(index + turn) % len(MESSAGES)], tally)
        turn += 1


async def drive(server: LocalServer, conversations: int, duration_s: float) -> tuple[Tally, float]:
    tally = Tally()
    limits = httpx.Limits(max_connections=conversations + 4)
    async with server.client(timeout=httpx.Timeout(600.0), limits=limits) as client:
        started = time.perf_counter()
        deadline = started + duration_s
        await asyncio.gather(*(conversation_loop(client, i, deadline, tally) for i in range(conversations)))
        return tally, time.perf_counter() - started


def wait_ready(process: subprocess.Popen, base_url: str, log: Path, timeout_s: float = 600) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if process.poll() is not None:
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            raise RuntimeError(f"rapport serve exited with {process.returncode}: {tail}")
        try:
            if httpx.get(base_url + "/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError("rapport serve did not become ready")


@dataclass(frozen=True)
class LocalServer:
    """A running `rapport serve`: its URL and the headers that carry its (throw-away) operator's key."""

    url: str
    headers: dict[str, str]

    def client(self, **kwargs) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.url, headers=self.headers, **kwargs)


@contextmanager
def local_server(home: Path, **env: str) -> Iterator[LocalServer]:
    """`rapport serve` over `home` on a free loopback port with a fresh admin key (the bench reads exports) and no
    rate limits, with `env` on top; yields it once it is ready and stops it after. Its log goes to
    `home/serve.log`: a pipe that nobody reads fills after 64 KB of log lines and then blocks the server (a whole
    `bench chat` hung so)."""
    base_url = f"http://127.0.0.1:{free_port()}"
    key = "bench-" + secrets.token_urlsafe(24)
    env = {**os.environ, "RAPPORT_HOME": str(home), "RAPPORT_API_RATE_PER_MINUTE": "0",
           "RAPPORT_API_USER_RATE_PER_MINUTE": "0", "RAPPORT_API_KEYS": "", "RAPPORT_ADMIN_KEYS": key, **env}
    log = home / "serve.log"
    with log.open("ab") as sink:
        process = subprocess.Popen([sys.executable, "-m", "bot.cli", "serve", "--port", base_url.rsplit(":", 1)[1],
                                    "--log-level", "warning"], env=env, stdout=subprocess.DEVNULL, stderr=sink)
    try:
        wait_ready(process, base_url, log)
        yield LocalServer(base_url, {"Authorization": f"Bearer {key}"})
    finally:
        stop_process(process)


def stop_process(process: subprocess.Popen, timeout_s: float = 30) -> None:
    """SIGTERM, then SIGKILL if it has not exited within `timeout_s`."""
    process.terminate()
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()


def run(settings: Settings, *, conversations: int = 16, duration_s: float = 60, new_tokens: int = 48) -> dict:
    """Start a server, drive it, stop it; returns the JSON-able report."""
    home = Path(tempfile.mkdtemp(prefix="rapport-bench-serve-"))
    if settings.models_dir.is_dir():  # reuse the converted model instead of converting it again
        (home / "models").symlink_to(settings.models_dir.resolve(), target_is_directory=True)
    try:
        with local_server(home, RAPPORT_MAX_NEW_TOKENS=str(new_tokens)) as server:
            tally, wall_s = asyncio.run(drive(server, conversations, duration_s))
            metrics = httpx.get(server.url + "/metrics", timeout=10).text
    finally:
        shutil.rmtree(home, ignore_errors=True)
    turns = len(tally.turn_s)
    return {
        "conversations": conversations, "duration_s": duration_s, "wall_s": round(wall_s, 2),
        "max_new_tokens": new_tokens, "model": settings.model or "embedded SmolLM2-135M-Instruct",
        "turns": turns, "errors": len(tally.errors), "error_samples": sorted(set(tally.errors))[:5],
        "turns_per_s": round(turns / wall_s, 3), "completion_tokens_per_s": round(tally.completion_tokens / wall_s, 1),
        "turn_p50_s": percentile(tally.turn_s, 0.5), "turn_p95_s": percentile(tally.turn_s, 0.95),
        "ttft_p50_s": percentile(tally.ttft_s, 0.5), "ttft_p95_s": percentile(tally.ttft_s, 0.95),
        "turn_mean_s": round(statistics.fmean(tally.turn_s), 3) if turns else None,
        "server_turns_counted": sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                                    if line.startswith("rapport_turns_total{")),
    }
