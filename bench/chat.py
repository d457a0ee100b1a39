"""`rapport bench chat`: scripted users tell their lives in one conversation and ask about them in a new one.

Each user in `bench/data/chat_users.jsonl` states facts (name, city, job, pets, people, birthday, plans,
preferences; some told indirectly, "I moved to Lyon last year") among small talk and ordinary requests,
then opens a new conversation and asks about them (some questions compound) besides more requests. The
turns go through a real `rapport serve` on 127.0.0.1 (the native endpoint, default settings, a throw-away
RAPPORT_HOME that borrows the converted model and the CPU calibration from yours), one user at a time.

Every reply is judged here, on the whole text the user saw, with the guard's definitions
(`dialogue/guard.py`) and checks the guard does not make: the echo of any one sentence, the same reply
again anywhere for that user, and role confusion against every fact the user stated (the guard knows only
the recalled ones). A question about the user is recalled when every expected part is in the reply.
Users are split "tune" and "heldout"; the held-out ones were written with the rest and are reported apart.
"""

from __future__ import annotations

import asyncio
import json
import random
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from bench.serve import LocalServer, local_server, percentile
from dialogue.guard import FIRST, SENTENCE, echo, longest_run, loop, repeat, role_confusion, words
from dialogue.settings import Settings

DATA = Path(__file__).parent / "data" / "chat_users.jsonl"
SENTENCE_ECHO_SHARE = 0.8  # a reply sentence that is this much a copy of the user's words, in their person
SPLITS = ("tune", "heldout")


def load_users(path: Path = DATA) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def pick_users(users: list[dict], n: int, seed: int, split: str = "all") -> list[dict]:
    """`n` users (0: all) of `split`, drawn with `seed` but in file order; both splits in proportion."""
    pool = [u for u in users if split == "all" or u["split"] == split]
    if not n or n >= len(pool):
        return pool
    rng = random.Random(seed)
    chosen: list[dict] = []
    for name in SPLITS:  # each split in proportion, at least one of each when two or more are asked for
        members = [u for u in pool if u["split"] == name]
        share = round(n * len(members) / len(pool)) if split == "all" else n
        share = max(share, 1 if members and n >= 2 else 0)
        chosen += rng.sample(members, min(share, len(members)))
    chosen = chosen[:n] if len(chosen) > n else chosen
    return [u for u in pool if u in chosen]


def sentence_echo(reply: str, user_text: str) -> bool:
    """A sentence of the reply that is mostly a run of the user's words, with the user's "I/my" kept."""
    user = words(user_text)
    for sentence in SENTENCE.split(reply):
        mine = words(sentence)
        if len(mine) < 3:
            continue
        length, start = longest_run(mine, user)
        if length >= 3 and length >= SENTENCE_ECHO_SHARE * len(mine) and any(w in FIRST for w in mine[start:start + length]):
            return True
    return False


def judge(reply: str, *, user_text: str, earlier: list[str], everything_before: list[str], facts: list[str],
          name: str) -> dict[str, bool]:
    """What is wrong with one shown reply; `earlier`: this conversation's replies, `everything_before`: the user's."""
    tokens = words(reply)
    if not tokens:
        return {"empty": True, "echo": False, "repeat": False, "loop": False, "role_confusion": False}
    same = " ".join(tokens)
    return {
        "empty": False,
        "echo": not echo(tokens, words(user_text)).ok or sentence_echo(reply, user_text),
        "repeat": not repeat(tokens, earlier).ok or any(" ".join(words(r)) == same for r in everything_before),
        "loop": not loop(reply).ok,  # round in circles inside the reply itself
        "role_confusion": not role_confusion(reply, facts, name).ok,
    }


def recalled(reply: str, expect: list[list[str]]) -> bool:
    """Every expected part (any of its spellings) is in the reply."""
    low = reply.lower()
    return all(any(option.lower() in low for option in part) for part in expect)


@dataclass
class Tally:
    turns: list[dict] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    memories: dict[str, list[str]] = field(default_factory=dict)
    guard: dict[str, int] = field(default_factory=dict)


async def send(client: httpx.AsyncClient, conversation: str, user: str, text: str) -> tuple[dict, float]:
    started = time.perf_counter()
    response = await client.post(f"/v1/conversations/{conversation}/messages", json={"user_id": user, "text": text})
    elapsed = time.perf_counter() - started
    if response.status_code != 200:
        raise RuntimeError(f"HTTP {response.status_code}: {response.text[:200]}")
    return response.json(), elapsed


async def play(client: httpx.AsyncClient, user: dict, run_id: str, tally: Tally) -> None:
    """Both conversations of one user; each reply judged as it comes."""
    said: list[str] = []
    for phase, messages in (("tell", [{"text": t, "expect": None} for t in user["first"]]), ("ask", user["second"])):
        conversation = f"{user['user']}-{phase}-{run_id}"
        earlier: list[str] = []
        for message in messages:
            try:
                out, seconds = await send(client, conversation, user["user"], message["text"])
            except (httpx.HTTPError, RuntimeError) as exc:
                tally.errors.append(f"{user['user']}: {exc}"[:200])
                continue
            reply = out["reply"]
            row = {"user": user["user"], "split": user["split"], "phase": phase, "text": message["text"], "reply": reply,
                   "seconds": round(seconds, 3), "sources": [s["kind"] for s in out.get("sources", [])],
                   **judge(reply, user_text=message["text"], earlier=earlier, everything_before=said,
                           facts=user["facts"], name=user["name"])}
            if message["expect"]:
                row["expect"] = message["expect"]
                row["recalled"] = recalled(reply, message["expect"])
                row["asks_name"] = any(user["name"] in part for part in message["expect"])
            tally.turns.append(row)
            earlier.append(reply)
            said.append(reply)
    exported = (await client.get(f"/v1/users/{user['user']}/export")).json()
    tally.memories[user["user"]] = [m.get("text", "") for m in exported.get("memories", [])]
    for turn in exported.get("turns", []):
        outcome = turn.get("guard")
        if outcome:
            tally.guard[outcome] = tally.guard.get(outcome, 0) + 1


def rate(rows: list[dict], key: str) -> float | None:
    return round(sum(bool(r[key]) for r in rows) / len(rows), 4) if rows else None


def summary(rows: list[dict], users: list[dict], memories: dict[str, list[str]]) -> dict:
    """The report's numbers over `rows` (the turns of `users`)."""
    questions = [r for r in rows if "expect" in r]
    named = [r for r in questions if r["asks_name"]]
    ordinary = [r for r in rows if "expect" not in r]
    asked = {(u["user"], m["text"]) for u in users for m in u["second"]} | {
        (u["user"], t) for u in users for t in u["first"] if t.rstrip().endswith("?")}
    kept = [m for u in users for m in memories.get(u["user"], [])]
    questions_kept = sum(1 for u in users for m in memories.get(u["user"], []) if (u["user"], m) in asked)
    seconds = [r["seconds"] for r in rows]
    return {
        "users": len(users), "turns": len(rows),
        "echo_rate": rate(rows, "echo"), "repeat_rate": rate(rows, "repeat"), "loop_rate": rate(rows, "loop"),
        "role_confusion_rate": rate(rows, "role_confusion"), "empty_rate": rate(rows, "empty"),
        "empty_replies": sum(r["empty"] for r in rows),
        "recall_accuracy": rate(questions, "recalled"), "questions": len(questions),
        "name_recall": rate(named, "recalled"),  # the user's name given when asked for
        "memories": len(kept), "questions_kept_as_memory": questions_kept,
        "turn_p50_s": percentile(seconds, 0.5), "turn_p95_s": percentile(seconds, 0.95),
        "turn_mean_s": round(statistics.fmean(seconds), 3) if seconds else None,
        # the turns the model writes in every configuration (statements, small talk, requests)
        "ordinary_turn_p50_s": percentile([r["seconds"] for r in ordinary], 0.5),
        "ordinary_turn_p95_s": percentile([r["seconds"] for r in ordinary], 0.95),
    }


FAILURES = ("echo", "repeat", "loop", "role_confusion", "empty")


def failures(rows: list[dict], limit: int = 12) -> list[dict]:
    """A sample of what went wrong, to read (not to count)."""
    bad = [{"user": r["user"], "text": r["text"], "reply": r["reply"][:240],
            "why": [k for k in FAILURES if r[k]] + ([] if r.get("recalled", True) else ["not_recalled"])}
           for r in rows if any(r[k] for k in FAILURES) or r.get("recalled") is False]
    return bad[:limit]


async def drive(server: LocalServer, users: list[dict], run_id: str) -> tuple[Tally, float]:
    tally = Tally()
    async with server.client(timeout=httpx.Timeout(600.0)) as client:
        started = time.perf_counter()
        for user in users:  # one at a time, as people type: turn times are those of a quiet server
            await play(client, user, run_id, tally)
        return tally, time.perf_counter() - started


def backend_path(settings: Settings) -> dict:
    """The CPU path the server ran (the same home, so the same cached calibration)."""
    from dialogue.model.backend import LocalBackend

    if settings.backend != "local":
        return {"backend": settings.backend}
    backend = LocalBackend(settings)
    try:
        asyncio.run(backend.ready())
        return {k: v for k, v in backend.path().items() if not k.endswith("_us")}
    finally:
        backend.close()


def borrow(home: Path, settings: Settings) -> None:
    """Link the converted model and the CPU calibration of `settings.home` into the throw-away `home` (converted
    there first when missing): every run then takes the same measured path, and none converts again."""
    if settings.backend == "local" and not settings.models_dir.is_dir():
        from dialogue.model.files import resolve_model_dir

        resolve_model_dir(settings.model, settings.models_dir)
    for name in ("models", "calibration"):
        source = settings.home / name
        source.mkdir(parents=True, exist_ok=True)
        (home / name).symlink_to(source.resolve(), target_is_directory=True)


def run(settings: Settings, *, users: int = 6, seed: int = 0, split: str = "all", samples: bool = False) -> dict:
    """Start a server, play the chosen users through it, stop it; the JSON-able report."""
    chosen = pick_users(load_users(), users, seed, split)
    home = Path(tempfile.mkdtemp(prefix="rapport-bench-chat-"))
    borrow(home, settings)
    with local_server(home) as server:
        tally, wall_s = asyncio.run(drive(server, chosen, f"s{seed}"))
    try:
        path = backend_path(settings.model_copy(update={"home": home}))
    finally:
        shutil.rmtree(home, ignore_errors=True)
    report = {"model": settings.model or "embedded SmolLM2-135M-Instruct", "seed": seed, "wall_s": round(wall_s, 1),
              "errors": len(tally.errors), "error_samples": tally.errors[:5], "path": path,
              **summary(tally.turns, chosen, tally.memories), "guard_outcomes": dict(sorted(tally.guard.items()))}
    report["by_split"] = {name: summary([r for r in tally.turns if r["split"] == name],
                                        [u for u in chosen if u["split"] == name], tally.memories)
                          for name in SPLITS if any(u["split"] == name for u in chosen)}
    report["failures"] = failures([r for r in tally.turns if r["split"] == "tune" or split == "heldout"])
    if samples:
        report["turn_log"] = tally.turns
    return report


if __name__ == "__main__":  # python -m bench.chat [users] [seed] [split] (with every turn)
    args = sys.argv[1:]
    print(json.dumps(run(Settings(), users=int(args[0]) if args else 6, seed=int(args[1]) if len(args) > 1 else 0,
                         split=args[2] if len(args) > 2 else "all", samples=True), indent=1))
