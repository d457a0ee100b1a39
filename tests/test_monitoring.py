"""Monitoring: the store's activity buckets (SQLite and PostgreSQL) and the turn metrics of every channel."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from dialogue.store import TranscriptStore, Turn

T0 = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)


def at(minute: float, *, version=None, latency=100, handoff=False, finish="stop", model="m", conversation="c1") -> Turn:
    return Turn(conversation_id=conversation, user_id="u1", channel="api", user_text="q", reply="a", model_id=model,
                adapter_version=version, latency_ms=latency, handoff=handoff, finish_reason=finish,
                created_at=T0 + timedelta(minutes=minute), finished_at=T0 + timedelta(minutes=minute))


@pytest.fixture
def store(db_url):
    store = TranscriptStore(db_url)
    store.ensure_conversation(conversation_id="c1", user_id="u1", channel="api")
    yield store
    store.close()


def test_activity_buckets_turns_latency_ratings_and_handoffs_per_version(store):
    rated = []
    for i in range(20):  # minute 0, base model: latencies 10..200 ms
        rated.append(store.record_turn(at(0.01 * i, latency=10 * (i + 1))))
    store.record_turn(at(0.5, latency=0, handoff=True, finish="handoff", model="rule"))  # the gate asked for a person
    store.record_turn(at(1.2, version="v0001", latency=300))
    store.record_turn(at(1.3, version="v0001", latency=500))
    store.record_turn(at(1.4, model="human", finish="agent"))  # an agent's reply: not the bot's
    store.record_turn(at(-5))  # before the window
    for t in rated[:3]:
        store.rate(turn_id=t.id, rating=1)
    store.rate(turn_id=rated[3].id, rating=-1)

    buckets = store.activity(since=T0, bucket_s=60)
    by = {(b.start, b.version): b for b in buckets}
    assert list(by) == [(T0, ""), (T0 + timedelta(minutes=1), "v0001")]
    base = by[(T0, "")]
    assert (base.turns, base.handoffs, base.up, base.down) == (21, 1, 3, 1)
    assert base.latency_p95_ms == 190 and base.latency_p50_ms == 100  # the gate's answer is not a latency
    b = by[(T0 + timedelta(minutes=1), "v0001")]
    assert (b.turns, b.handoffs, b.latency_p95_ms) == (2, 0, 500)
    # a window's end, and a bucket of the whole hour
    assert [x.turns for x in store.activity(since=T0, until=T0 + timedelta(minutes=1))] == [21]
    assert sorted((x.version, x.turns) for x in store.activity(since=T0, bucket_s=3600)) == [("", 21), ("v0001", 2)]


# -- Prometheus: every channel's turns, counted once, with bounded labels --------------------------------------


def turns_counted(app, **labels) -> float:
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    prefix = "rapport_turns_total{" + (wanted + "}" if labels else "")
    lines = [line for line in app.state.metrics.render().decode().splitlines() if line.startswith(prefix)]
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines)


def test_adapter_channel_and_finish_labels_stay_bounded():
    from bot.http.metrics import MAX_ADAPTER_LABELS, ApiMetrics

    metrics = ApiMetrics()
    for i in range(MAX_ADAPTER_LABELS + 10):
        metrics.observe_turn(Turn(conversation_id="c", user_id="u", channel=f"made-up-{i}", user_text="q", reply="a",
                                  adapter_version=f"v{i:04d}", finish_reason="weird", latency_ms=20))
    metrics.observe_turn(Turn(conversation_id="c", user_id="u", channel="telegram", user_text="q", reply="a",
                              adapter_version="bad name with spaces"))
    text = metrics.render().decode()
    counted = [line for line in text.splitlines() if line.startswith("rapport_turns_total{")]
    versions = {line.split('adapter_version="')[1].split('"')[0] for line in counted}
    assert len(versions) == MAX_ADAPTER_LABELS + 1 and "other" in versions and "v0000" in versions
    assert {line.split('channel="')[1].split('"')[0] for line in counted} == {"other", "telegram"}
    assert all('finish_reason="other"' in line for line in counted if 'channel="other"' in line)


@pytest.fixture
def tg_standin():
    from tests.telegram_standin import Standin

    server = Standin(token="123:ABC").start()
    yield server
    server.stop()


async def test_a_telegram_turn_is_counted_with_its_channel_and_adapter_version(tiny_settings, tg_standin):
    import asyncio

    from bot.http.app import create_app
    from bot.services import open_services
    from bot.telegram.handlers import TelegramBot, run_bot
    from dialogue.manager import Context

    services = open_services(tiny_settings)
    try:
        await services.backend.ready()
        app = create_app(services)  # `serve --telegram`: one process, one /metrics

        async def recall(user_id, text):
            return Context(answer="Hello from the shop.")
        services.manager.recall = recall
        stop, ready = asyncio.Event(), asyncio.Event()
        task = asyncio.create_task(run_bot(TelegramBot(services), "123:ABC", base_url=tg_standin.base_url, stop=stop,
                                           ready=ready))
        await asyncio.wait_for(ready.wait(), 20)
        tg_standin.message("Hello there", chat_id=1001)
        await tg_standin.wait_for(lambda: any("Hello from the shop" in (m.text or "") for m in tg_standin.sent_to(1001)),
                                  30, "the reply")
        await asyncio.sleep(0.2)
        stop.set()
        await asyncio.wait_for(task, 20)
        assert turns_counted(app, channel="telegram", finish_reason="stop", adapter_version="base") == 1
    finally:
        services.close()


def test_a_chatwoot_turn_is_counted_once_with_its_channel(tiny_settings):
    from test_api import LiveServer, recorder_app, wait_for
    from test_chatwoot import Rig, message_event, posts

    app, calls = recorder_app()
    with LiveServer(app) as standin:
        rig = Rig(tiny_settings, standin.url)
        try:
            assert rig.post(message_event(5001, "Hello! Do you repair bikes?")).json()["accepted"] is True
            wait_for(lambda: len(posts(calls)) == 1)
            assert turns_counted(rig.app, channel="chatwoot", finish_reason="stop", adapter_version="base") == 1
            assert turns_counted(rig.app) == 1  # counted in one place: not again by the API's routes
        finally:
            rig.close()


# -- the console's Monitoring page ------------------------------------------------------------------------------

from test_console import ADMIN, PLAIN, api, browser, keyed, shoot  # noqa: E402,F401 - fixtures shared with the console's tests


def test_the_monitoring_page_draws_each_version_and_shows_the_scheduled_runs(keyed, browser):  # noqa: F811
    from bot.http.app import create_app
    from test_api import LiveServer
    from test_training import FAST, conversation
    from training.importer import import_lines
    from training.schedule import RetrainScheduler

    now = datetime.now(UTC)
    keyed.store.ensure_conversation(conversation_id="older", user_id="u9", channel="telegram")
    for i in range(6):  # an adapter's turns a few minutes ago, as if served before a restart
        t = at(0, version="v0001", latency=200 + 50 * i, conversation="older")
        t.user_id, t.created_at = "u9", now - timedelta(minutes=3 + i)
        keyed.store.record_turn(t)
    with LiveServer(create_app(keyed)) as server:
        reply = api(server.url, "/v1/conversations/m1/messages", {"user_id": "lena", "text": "Hello there"})
        api(server.url, f"/v1/turns/{reply['turn_id']}/rating", {"rating": 1, "user_id": "lena"})
        import_lines(keyed.store, [conversation(i) for i in range(8)], system=keyed.settings.system_prompt,
                     max_chars=1000)  # rated history to learn from (imported turns are not live traffic)
        run = RetrainScheduler(keyed.settings.model_copy(update={"retrain_min_examples": 1}), keyed.store,
                               config=FAST).check()
        assert run["status"] == "done"
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.set_default_timeout(15_000)
        page.goto(server.url + "/admin/login")
        page.fill("input[name=key]", ADMIN)
        page.click("button[type=submit]")
        page.wait_for_url("**/admin/conversations")
        page.click("nav >> text=Monitoring")
        page.wait_for_url("**/admin/monitoring")
        page.click("text=1h")
        page.wait_for_url("**/admin/monitoring?window=1h")
        assert page.locator("svg.chart").count() == 4
        turns_chart = page.locator("svg.chart[aria-label='turns per minute']")
        assert turns_chart.locator("polyline[data-version='v0001']").count() == 1  # six buckets: a line
        assert turns_chart.locator("polyline[data-version='base']").count() == 1  # zeros where it served none
        base = page.locator("tr[data-version='base']").inner_text()
        assert "100 %" in base and "of 1" in base  # its one rated reply was a thumbs-up
        assert page.locator("tr[data-version='v0001'] td").nth(1).inner_text() == "6"
        runs = page.locator("table.retrain-runs tbody tr")
        assert runs.count() == 1 and run["version"] in runs.inner_text() and "17 new examples" in runs.inner_text()
        assert ("passed" if run["gate_passed"] else "failed") in runs.inner_text()
        shoot(page, "monitoring")
        page.close()
