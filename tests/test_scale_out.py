"""The documented multi-process mode, for real: a Chroma server (`chroma run`), PostgreSQL, two `rapport serve`
processes over the tiny model; and the short version of `rapport bench soak` (one of them killed on the way)."""

from __future__ import annotations

import time

import httpx
import pytest

from tests.conftest import PG_URL


@pytest.fixture
def tiny_env(tiny_settings, tiny_model_dir, monkeypatch):
    for name, value in {"RAPPORT_MODEL": str(tiny_model_dir), "RAPPORT_DTYPE": "float32", "RAPPORT_THREADS": "1",
                        "RAPPORT_MAX_NEW_TOKENS": "8", "RAPPORT_CONTEXT_BUDGET": "2048"}.items():
        monkeypatch.setenv(name, value)
    return tiny_settings


def test_two_processes_see_each_others_memories_and_turns_at_once(tiny_env, pg_url):
    from bench.soak import cluster

    with cluster(tiny_env, PG_URL) as c:
        a, b = (httpx.Client(base_url=p.url, headers=c.headers, timeout=120) for p in c.processes)
        user = "lena"
        a.post(f"/v1/users/{user}/memories", json={"items": [{"text": "I live in Porto"}]})
        assert [h["text"] for h in b.get(f"/v1/users/{user}/memories/search", params={"q": "Porto"}).json()] \
            == ["I live in Porto"]  # B has read this user's memories once
        [memory_id] = a.post(f"/v1/users/{user}/memories", json={"items": [{"text": "I play the cello"}]}).json()["ids"]
        took = []
        for _ in range(5):
            started = time.perf_counter()
            hits = b.get(f"/v1/users/{user}/memories/search", params={"q": "cello", "k": 1}).json()
            took.append(time.perf_counter() - started)
            assert [h["id"] for h in hits] == [memory_id]  # written through A, found through B at once
        assert b.delete(f"/v1/users/{user}/memories/{memory_id}").status_code == 200
        assert [h["text"] for h in a.get(f"/v1/users/{user}/memories/search", params={"q": "cello"}).json()] \
            == ["I live in Porto"]  # forgotten through B, gone through A at once
        a.post("/v1/users/max/memories", json={"items": [{"text": "I keep bees"}]})
        assert len(b.get("/v1/users/max/memories/search", params={"q": "bees"}).json()) == 1
        assert a.delete("/v1/users/max").status_code == 200  # erased through A (a compaction on a server: none)
        after = b.get("/v1/users/max/memories/search", params={"q": "bees"})
        assert after.status_code != 200 or after.json() == []  # refused or empty through B at once
        turn = a.post("/v1/conversations/c1/messages", json={"user_id": user, "text": "Hello there"})
        assert turn.status_code == 200, turn.text
        assert b.get("/v1/conversations/c1").json()["user_id"] == user
        assert turn.json()["turn_id"] in [t["id"] for t in b.get(f"/v1/users/{user}/export").json()["turns"]]
        a.close(), b.close()
    print(f"search through B: {min(took) * 1000:.0f}-{max(took) * 1000:.0f} ms")


def test_bench_soak_short_loses_nothing(tiny_env):
    from bench.soak import run

    report = run(tiny_env, pg_url=PG_URL, conversations=4, minutes=0.5, lease_s=2.0)
    print(report)
    assert report["restarts"] >= 1 and report["acknowledged"] > 0
    assert report["lost"] == 0 and report["duplicates"] == 0 and report["drift"] == 0
    assert report["server_errors"] == 0, report["error_samples"]
