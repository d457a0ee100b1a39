"""The operators' console at /admin on the tiny model: login, sessions, CSRF, and in a real browser (Debian's
chromium driven by Playwright, never a downloaded browser) live conversations and a handoff answered by an agent."""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import shutil
import os
import tempfile
import time
from pathlib import Path

import pytest
from pydantic import SecretStr
from fastapi.testclient import TestClient

from bot.http.app import create_app
from bot.services import open_services
from memory.memories import MemoryItem
from test_api import ADMIN, PLAIN, LiveServer, recorder_app, wait_for

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--no-first-run"]
# screenshots of every page: into docs/console with RAPPORT_CONSOLE_SHOTS=docs/console (the README's), else a
# scratch folder, so that a test run leaves the tree as it was
SHOTS = Path(os.environ.get("RAPPORT_CONSOLE_SHOTS") or Path(tempfile.gettempdir()) / "rapport-console-shots")


@pytest.fixture
def keyed(tiny_settings):
    """Services with an API key and an admin key (the console needs the admin one)."""
    opened = open_services(tiny_settings.model_copy(update={"api_keys": [PLAIN], "admin_keys": [ADMIN]}))
    opened.backend.worker.wait_ready(60)
    yield opened
    opened.close()


def csrf_in(html: str) -> str:
    return re.search(r'name="csrf" value="([^"]+)"', html).group(1)


def log_in(client: TestClient, key: str):
    form = client.get("/admin/login")
    return client.post("/admin/login", data={"key": key, "csrf": csrf_in(form.text)}, follow_redirects=False)


def test_pages_need_a_session_and_an_admin_key_opens_one(keyed):
    with TestClient(create_app(keyed), base_url="http://127.0.0.1") as c:
        assert c.get("/admin/conversations", follow_redirects=False).headers["location"] == "/admin/login"
        assert c.get("/admin/live/conversations").status_code == 401
        refused = log_in(c, "not-a-key")
        assert refused.status_code == 403 and "not an admin key" in refused.text and "rapport_console=" not in \
            refused.headers.get("set-cookie", "")
        answer = log_in(c, ADMIN)
        assert answer.status_code == 303 and answer.headers["location"] == "/admin/conversations"
        cookie = answer.headers["set-cookie"]
        assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/admin" in cookie
        assert ADMIN not in cookie
        page = c.get("/admin/conversations")
        assert page.status_code == 200 and "<h1>Conversations</h1>" in page.text
        c.post("/admin/logout", data={"csrf": csrf_in(page.text)})
        assert c.get("/admin/conversations", follow_redirects=False).status_code == 303


def test_a_non_admin_key_is_refused(keyed):
    with TestClient(create_app(keyed), base_url="http://127.0.0.1") as c:
        answer = log_in(c, PLAIN)
        assert answer.status_code == 403 and "not an admin key" in answer.text
        assert c.get("/admin/conversations", follow_redirects=False).headers["location"] == "/admin/login"


def test_a_forged_cookie_and_a_login_without_its_token_are_refused(keyed):
    with TestClient(create_app(keyed), base_url="http://127.0.0.1") as c:
        c.cookies.set("rapport_console", "made-up.0123", path="/admin")
        assert c.get("/admin/conversations", follow_redirects=False).status_code == 303
        c.get("/admin/login")
        assert c.post("/admin/login", data={"key": ADMIN, "csrf": "guessed"}).status_code == 403


def test_without_any_keys_the_console_stays_closed_even_open_and_a_missing_page_is_html(tiny_settings):
    opened = open_services(tiny_settings)
    try:
        with TestClient(create_app(opened, open_api=True), base_url="http://127.0.0.1") as c:
            form = c.get("/admin/login")
            assert "rapport keys create ops --scopes admin" in form.text  # the console has no open mode
            refused = c.post("/admin/login", data={"csrf": csrf_in(form.text)}, follow_redirects=False)
            assert refused.status_code == 403 and "not an admin key" in refused.text
            assert c.get("/admin/conversations", follow_redirects=False).status_code in (303, 307)
        opened.settings.admin_keys = [ADMIN]
        with TestClient(create_app(opened), base_url="http://127.0.0.1") as c:
            form = c.get("/admin/login")
            c.post("/admin/login", data={"key": ADMIN, "csrf": csrf_in(form.text)}, follow_redirects=False)
            missing = c.get("/admin/conversations/nobody-here")
            assert missing.status_code == 404 and "There is no conversation nobody-here." in missing.text
            assert missing.headers["content-type"].startswith("text/html")
    finally:
        opened.close()


def test_form_posts_without_the_csrf_token_are_refused(keyed):
    with TestClient(create_app(keyed), base_url="http://127.0.0.1") as c:
        turn = c.post("/v1/conversations/c1/messages", headers={"Authorization": f"Bearer {PLAIN}"},
                      json={"user_id": "u1", "text": "Hello there"})
        assert turn.status_code == 200, turn.text
        log_in(c, ADMIN)
        page = c.get("/admin/conversations/c1")
        assert page.status_code == 200 and "Hello there" in page.text
        for data in ({}, {"csrf": "wrong"}):
            refused = c.post("/admin/conversations/c1/take", data=data)
            assert refused.status_code == 403 and "CSRF" in refused.json()["error"]
        assert keyed.store.get_conversation("c1").status == "bot"
        assert c.post("/admin/conversations/c1/take", data={"csrf": csrf_in(page.text)}).status_code == 200
        assert keyed.store.get_conversation("c1").status == "human"


# -- in a real browser -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def browser():
    """Debian's chromium under Playwright, headless (`apt-get install chromium chromium-driver` when missing)."""
    if not shutil.which(CHROMIUM):
        pytest.fail(f"{CHROMIUM} is missing: apt-get install -y chromium chromium-driver")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield launched
        launched.close()


@pytest.fixture
def console(keyed, browser):
    """A live server over `keyed` and a logged-in browser page: (server url, page)."""
    with LiveServer(create_app(keyed)) as server:
        context = browser.new_context(viewport={"width": 1280, "height": 800})
        page = context.new_page()
        page.set_default_timeout(15_000)
        page.goto(server.url + "/admin")
        page.fill("input[name=key]", ADMIN)
        page.click("button[type=submit]")
        page.wait_for_url("**/admin/conversations")
        yield server.url, page
        context.close()


def shoot(page, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


def api(url: str, path: str, body: dict):
    import httpx

    response = httpx.post(url + path, json=body, headers={"Authorization": f"Bearer {PLAIN}"}, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()


def test_browser_login_is_refused_for_a_plain_key_and_accepted_for_an_admin_key(keyed, browser):
    with LiveServer(create_app(keyed)) as server:
        page = browser.new_page()
        page.goto(server.url + "/admin/conversations")
        assert page.url.endswith("/admin/login")
        page.fill("input[name=key]", PLAIN)
        page.click("button[type=submit]")
        assert "not an admin key" in page.inner_text("[role=alert]")
        shoot(page, "login")
        page.fill("input[name=key]", ADMIN)
        page.click("button[type=submit]")
        page.wait_for_url("**/admin/conversations")
        assert page.inner_text("h1") == "Conversations"
        page.close()


def test_a_message_through_the_api_appears_in_conversations_without_reload(console):
    url, page = console
    page.evaluate("window.notReloaded = true")
    reply = api(url, "/v1/conversations/live-1/messages", {"user_id": "lena", "text": "Hello! Is anyone there?",
                                                           "channel": "api"})
    row = page.locator("tr[data-conversation='live-1']")
    row.wait_for()
    assert "Hello! Is anyone there?" in row.inner_text() and "lena" in row.inner_text()
    assert page.evaluate("window.notReloaded") is True  # the same page: the row came by polling
    shoot(page, "conversations")
    row.locator("a").first.click()
    page.wait_for_url("**/admin/conversations/live-1")
    turn = page.locator(f"li[data-turn='{reply['turn_id']}']")
    assert "adapter base" in turn.inner_text() and " ms" in turn.inner_text()


def test_an_agent_takes_over_a_handoff_and_the_reply_reaches_the_customer(tiny_settings, browser):
    """The customer asks for a person; the operator answers from the queue; the integration's webhook stand-in
    receives the reply, it is recorded as the agent's turn, and the conversation goes back to the bot."""
    hook_app, calls = recorder_app()
    with LiveServer(hook_app) as hook:
        settings = tiny_settings.model_copy(update={"api_keys": [PLAIN], "admin_keys": [ADMIN],
                                                    "handoff_webhook_url": hook.url + "/hook",
                                                    "handoff_webhook_secret": SecretStr("hook-secret")})
        services = open_services(settings)
        services.backend.worker.wait_ready(60)
        try:
            with LiveServer(create_app(services)) as server:
                page = browser.new_page()
                page.set_default_timeout(15_000)
                page.goto(server.url + "/admin/login")
                page.fill("input[name=key]", ADMIN)
                page.click("button[type=submit]")
                page.goto(server.url + "/admin/handoffs")
                api(server.url, "/v1/conversations/help-1/messages", {"user_id": "omar", "text": "Hi"})
                api(server.url, "/v1/conversations/help-1/messages",
                    {"user_id": "omar", "text": "I want to talk to a human please"})
                waiting = api(server.url, "/v1/conversations/help-1/messages",
                              {"user_id": "omar", "text": "My parcel 8812 never arrived"})
                assert waiting["status"] == "human" and waiting["reply"] == ""
                row = page.locator("tr[data-conversation='help-1']")
                row.wait_for()  # the queue is live too
                assert "waiting" in row.inner_text()
                shoot(page, "handoffs")
                row.locator("a.button").click()
                page.wait_for_url("**/admin/conversations/help-1")
                page.fill("textarea[name=text]", "Sorry, Omar! I'm sending a new parcel today.")
                page.click("form.reply button[type=submit]")
                assert "sent to the integration's webhook" in page.inner_text("[role=status]")
                shoot(page, "conversation")

                wait_for(lambda: any(c["json"]["event"] == "conversation.agent_message" for c in calls))
                call = next(c for c in calls if c["json"]["event"] == "conversation.agent_message")
                message = call["json"]
                signed = hmac.new(b"hook-secret", call["body"], hashlib.sha256).hexdigest()
                assert call["headers"]["x-rapport-signature"] == f"sha256={signed}"  # signed as handoff events are
                assert message["conversation_id"] == "help-1" and message["user_id"] == "omar"
                assert message["text"] == "Sorry, Omar! I'm sending a new parcel today."
                agent = services.store.get_turn(message["turn_id"])
                assert (agent.model_id, agent.finish_reason, agent.reply_to) == ("human", "agent", waiting["turn_id"])
                assert agent.user_text == "My parcel 8812 never arrived"

                page.click("text=Hand back to the bot")
                assert "Handed back" in page.inner_text("[role=status]")
                assert services.store.get_conversation("help-1").status == "bot"
                back = api(server.url, "/v1/conversations/help-1/messages", {"user_id": "omar", "text": "Thanks!"})
                assert back["status"] == "bot"
                page.close()
        finally:
            services.close()


def logged_in(client: TestClient) -> str:
    """Log `client` in with the admin key; returns the session's CSRF token."""
    log_in(client, ADMIN)
    return csrf_in(client.get("/admin/conversations").text)


def test_the_list_filters_by_channel_status_adapter_and_rating(keyed):
    headers = {"Authorization": f"Bearer {PLAIN}"}
    with TestClient(create_app(keyed), base_url="http://127.0.0.1") as c:
        for conversation, user, channel in (("f1", "ana", "api"), ("f2", "ben", "web"), ("f3", "cy", "web")):
            c.post(f"/v1/conversations/{conversation}/messages", headers=headers,
                   json={"user_id": user, "text": "Hello there", "channel": channel})
        turn = keyed.store.history(conversation_id="f2", user_id="ben")[-1]
        c.post(f"/v1/turns/{turn.id}/rating", headers=headers, json={"rating": -1})
        keyed.store.set_status(conversation_id="f3", status="human")
        logged_in(c)

        def listed(**query) -> set[str]:
            html = c.get("/admin/live/conversations", params=query).text
            return set(re.findall(r'data-conversation="([^"]+)"', html))

        assert listed() == {"f1", "f2", "f3"}
        assert listed(channel="web") == {"f2", "f3"}
        assert listed(status="human") == {"f3"}
        assert listed(rating="down") == {"f2"} and listed(rating="up") == set() and listed(rating="none") == {"f1", "f3"}
        assert listed(adapter="base") == {"f1", "f2", "f3"} and listed(adapter="v0009") == set()
        page = c.get("/admin/conversations", params={"channel": "web"}).text
        assert 'data-live="/admin/live/conversations?channel=web"' in page and "<option selected>web</option>" in page


def test_users_page_searches_and_forgets_memories_exports_and_erases(keyed):
    with TestClient(create_app(keyed), base_url="http://127.0.0.1") as c:
        csrf = logged_in(c)
        keyed.store.ensure_conversation(conversation_id="m1", user_id="rosa", channel="api")
        ids = keyed.memory.for_user("rosa").add(
            [MemoryItem.from_json({"text": "Rosa keeps bees in Lisbon"}), MemoryItem.from_json({"text": "Rosa's cat is Miro"})])
        assert "rosa" in c.get("/admin/users", params={"q": "ros"}).text
        found = c.get("/admin/users/rosa", params={"q": "what pets does she have"}).text
        assert found.index("Miro") < found.index("bees")
        assert c.post(f"/admin/users/rosa/memories/{ids[0]}/forget", data={"csrf": csrf}).status_code == 200
        assert [m.id for m in keyed.memory.for_user("rosa").list()] == [ids[1]]
        export = c.get("/admin/users/rosa/export")
        assert export.json()["user_id"] == "rosa" and "attachment" in export.headers["content-disposition"]
        kept = c.post("/admin/users/rosa/erase", data={"csrf": csrf, "confirm": "not-rosa"})
        assert "Type the user id" in kept.text and keyed.store.get_conversation("m1") is not None
        erased = c.post("/admin/users/rosa/erase", data={"csrf": csrf, "confirm": "rosa"})
        assert "Erased rosa" in erased.text and keyed.store.get_conversation("m1") is None
        assert keyed.memory.for_user("rosa").list() == []


def test_faq_entries_are_added_edited_deleted_and_a_question_tried(keyed):
    with TestClient(create_app(keyed), base_url="http://127.0.0.1") as c:
        csrf = logged_in(c)
        jsonl = "\n".join(json.dumps(e) for e in (
            {"id": "hours", "question": "When are you open?", "answer": "We are open 9:00-18:00, Monday to Saturday."},
            {"id": "returns", "question": "How do I return an item?", "answer": "Returns are free within 30 days."}))
        assert "Imported 2 entries" in c.post("/admin/faq/import", data={"csrf": csrf, "format": "jsonl",
                                                                         "text": jsonl}).text
        bad = c.post("/admin/faq/import", data={"csrf": csrf, "format": "jsonl", "text": '{"id": "x"}'})
        assert "line 1" in bad.text and len(keyed.faq.list()) == 2
        saved = c.post("/admin/faq/save", data={"csrf": csrf, "id": "hours", "question": "What are your opening hours?",
                                               "answer": "We are open 9:00-18:00, Monday to Saturday.", "tags": "shop",
                                               "alternates": "When do you open?\nAre you open on Sunday?"})
        assert "Saved hours" in saved.text
        assert keyed.faq.get("hours").alternates == ["When do you open?", "Are you open on Sunday?"]
        tried = c.get("/admin/faq", params={"q": "what are your opening hours"}).text
        decision = re.search(r'<span id="decision">(\w+)</span>', tried).group(1)
        assert decision in ("answer", "ground") and tried.index("hours") < tried.index("returns", tried.index("Decision"))
        assert c.post("/admin/faq/returns/delete", data={"csrf": csrf}).status_code == 200
        assert [e.id for e in keyed.faq.list()] == ["hours"]
        assert c.post("/admin/faq/returns/delete", data={}).status_code == 403


def registered(settings, tmp_path, content: bytes, **metrics) -> str:
    """An adapter directory registered without training (the registry and these pages only read its files)."""
    from training.registry import Registry

    registry = Registry(settings.adapters_dir)
    registry.directory.mkdir(parents=True, exist_ok=True)
    moved = registry.directory / f".train-{content.hex()}"
    moved.mkdir()
    (moved / "adapter_model.safetensors").write_bytes(content)
    (moved / "adapter_config.json").write_text("{}")
    version = registry.claim(moved, parent=None, dataset_hash="d" * 16, metrics=metrics).version
    registry.record_gate(version, {"passed": True}, metrics)  # only a gated version may be promoted
    return version


def served(store, name: str | None, conversation: str, ratings: list[int], latency_ms: int = 100) -> None:
    """Turns as a serving process records them, from `name`, rated in order."""
    from dialogue.store import Turn

    store.ensure_conversation(conversation_id=conversation, user_id=f"user-{conversation}", channel="api")
    for rating in ratings:
        turn = store.record_turn(Turn(conversation_id=conversation, user_id=f"user-{conversation}", user_text="q",
                                      reply="a", model_id="tiny", adapter_version=name, latency_ms=latency_ms))
        store.rate(turn_id=turn.id, rating=rating)


def test_adapters_promote_a_share_and_the_experiment_decides_and_its_button_promotes(keyed, tmp_path):
    from training.registry import Registry

    registry = Registry(keyed.settings.adapters_dir)
    first = registered(keyed.settings, tmp_path, b"first", canary_ppl=12.5, examples=40)
    second = registered(keyed.settings, tmp_path, b"second", canary_ppl=12.1, examples=55)
    with TestClient(create_app(keyed), base_url="http://127.0.0.1") as c:
        csrf = logged_in(c)
        page = c.get("/admin/adapters").text
        assert f'data-version="{first}"' in page and "canary perplexity" in page and "55 examples" in page
        assert "No A/B split is running" in c.get("/admin/experiments").text
        assert "is active" in c.post(f"/admin/adapters/{first}/promote", data={"csrf": csrf}).text
        served(keyed.store, registry.get(second).name, "early", [-1] * 30)  # before the split began: not counted
        time.sleep(1.1)  # the split's start is stored to the second
        split = c.post(f"/admin/adapters/{second}/promote", data={"csrf": csrf, "share": "30"})
        assert "serves 30% of users" in split.text and registry.state().ab["share"] == pytest.approx(0.3)
        a, b = (registry.get(v).name for v in (first, second))
        for i in range(5):  # A: 60 % liked, B: 90 % liked, 240 rated turns each
            served(keyed.store, a, f"a{i}", [1] * 29 + [-1] * 19, latency_ms=200 + i)
            served(keyed.store, b, f"b{i}", [1] * 43 + [-1] * 5, latency_ms=100 + i)
        served(keyed.store, None, "other", [-1] * 5)  # the base model is neither variant here
        report = c.get("/admin/experiments").text
        assert '<strong id="decision">B is better: promote</strong>' in report
        assert re.search(r'data-variant="B">.*?89\.6 %', report, re.S) and "Promote " + second in report
        assert re.search(r'data-variant="B">.*?<td>240</td><td>240</td>', report, re.S) and "102 / 104 ms" in report
        from click.testing import CliRunner

        from bot.cli.train import adapters_group

        printed = CliRunner().invoke(adapters_group, ["experiment", "--json"], catch_exceptions=False)
        same = json.loads(printed.output)
        assert same["decision"] == "B is better: promote" and same["action"] == "promote"
        assert [v["rated"] for v in same["variants"]] == [240, 240] and same["variants"][1]["thumbs_up_ci95"][0] > 0.85
        done = c.post(f"/admin/adapters/{second}/promote", data={"csrf": csrf, "back": "/admin/experiments"})
        assert "is active" in done.text and registry.state().active == second and registry.state().ab is None
        assert "No A/B split is running" in done.text
        ended = re.search(rf'<tr data-past="{second}">(.*?)</tr>', done.text, re.S).group(1)  # listed under it
        assert f"{second} vs {first}" in ended and "promoted" in ended and "89.6 %" in ended
        assert "B is better: promote · P(B better)" in ended
        [past] = json.loads(CliRunner().invoke(adapters_group, ["experiment", "--json"]).output)["past"]
        assert (past["a"], past["b"], past["share"], past["ended"]) == (first, second, 0.3, "promoted")
        assert past["decision"] == "B is better: promote" and [v["rated"] for v in past["variants"]] == [240, 240]
        rolled = c.post("/admin/adapters/rollback", data={"csrf": csrf})
        assert "Rolled back" in rolled.text and registry.state().active == first
        feedback = c.get("/admin/feedback").text
        assert feedback.count("👎") >= 5


def test_a_correction_is_approved_for_training_from_the_feedback_page(keyed):
    from dialogue.store import Turn
    from training.datasets import build_dataset

    store = keyed.store
    store.ensure_conversation(conversation_id="fb1", user_id="ann", channel="api")
    turn = store.record_turn(Turn(conversation_id="fb1", user_id="ann", user_text="when?", reply="no idea"))
    store.rate(turn_id=turn.id, rating=-1, correction="We open at nine.")
    assert not [e for e in build_dataset(store, system="s", heldout_fraction=0.0).train if e.source == "correction"]
    with TestClient(create_app(keyed), base_url="http://127.0.0.1") as c:
        csrf = logged_in(c)
        assert "Approve for training" in c.get("/admin/feedback?only=corrections").text
        assert c.post(f"/admin/feedback/{turn.id}/approve", data={}).status_code == 403  # no CSRF token
        done = c.post(f"/admin/feedback/{turn.id}/approve", data={"csrf": csrf})
        assert "approved: the next training run learns from it" in done.text and "Approve for training" not in done.text
    assert [e.completion for e in build_dataset(store, system="s", heldout_fraction=0.0).train
            if e.source == "correction"] == ["We open at nine."]


def test_the_feedback_page_keeps_ratings_and_corrections_out_of_training_and_undoes_that(keyed):
    from dialogue.store import Rating, Turn
    from training.datasets import build_dataset

    store = keyed.store
    store.ensure_conversation(conversation_id="fb3", user_id="cal", channel="api")
    liked = store.record_turn(Turn(conversation_id="fb3", user_id="cal", user_text="hi", reply="Hello, Cal!"))
    wrong = store.record_turn(Turn(conversation_id="fb3", user_id="cal", user_text="open monday?", reply="no idea"))
    store.rate(turn_id=liked.id, rating=1)
    store.rate(turn_id=wrong.id, rating=-1, correction="Yes, from nine.")

    def taught() -> list[tuple[str, str]]:
        return sorted((e.source, e.completion) for e in build_dataset(store, system="s", heldout_fraction=0.0).train)

    def row(html: str, turn) -> str:
        return re.search(rf'<tr data-turn="{turn.id}">(.*?)</tr>', html, re.S).group(1)

    assert taught() == [("disliked", "no idea"), ("liked", "Hello, Cal!")]
    with TestClient(create_app(keyed), base_url="http://127.0.0.1") as c:
        csrf = logged_in(c)

        def review(turn, decision: str, part: str):
            return c.post(f"/admin/feedback/{turn.id}/{decision}", data={"csrf": csrf, "part": part})

        assert c.post(f"/admin/feedback/{liked.id}/keep-out", data={"part": "rating"}).status_code == 403  # no CSRF
        kept = review(liked, "keep-out", "rating")
        assert "kept out: the rating teaches no training run" in kept.text
        assert "kept out" in row(kept.text, liked) and "Undo" in row(kept.text, liked)
        review(wrong, "approve", "correction")
        assert taught() == [("correction", "Yes, from nine."), ("disliked", "no idea")]
        review(wrong, "keep-out", "rating")
        withdrawn = review(wrong, "undo", "correction")  # an approval withdrawn: it waits for review again
        assert "Approve for training" in row(withdrawn.text, wrong) and taught() == []
        assert build_dataset(store, system="s").dropped == {"kept_out": 2}
        out = review(wrong, "keep-out", "correction")
        assert "kept out: the correction teaches no training run" in out.text
        assert "Approve for training" not in row(out.text, wrong)
        with store.session() as session:
            decided = session.get(Rating, wrong.id)
        assert (decided.kept_out, decided.correction_trusted, decided.correction_kept_out) == (True, False, True)
        assert decided.reviewed_at is not None
        review(liked, "undo", "rating")
        assert taught() == [("liked", "Hello, Cal!")]
        assert "no such decision on a rating: approve" in review(liked, "approve", "rating").text
        assert f"turn {liked.id} has no correction" in review(liked, "keep-out", "correction").text


def test_browser_promote_a_trained_version_to_a_share_see_the_split_and_erase_a_user(keyed, browser):
    """A real adapter trained on the tiny model, promoted to half the users from the Adapters page: the Experiments
    page shows turns on both sides; then a user is erased from the Users page."""
    from test_training import FAST, conversation
    from training.importer import import_lines
    from training.pipeline import train_version
    from training.registry import Registry, ab_bucket

    settings = keyed.settings
    import_lines(keyed.store, [conversation(i) for i in range(24)], system=settings.system_prompt, max_chars=1000)
    trained = train_version(settings, keyed.store, config=FAST, show_progress=False)
    registry_dir = settings.adapters_dir
    if not trained["gate"]["passed"]:  # a random tiny model may fail its canary; serving is what is tested here
        with Registry(registry_dir).transaction() as state:
            state.versions[trained["version"]].status = "candidate"
    version = trained["version"]
    earlier = Registry(registry_dir, keyed.store)
    earlier.promote(version, 0.2)
    earlier.rollback(ended="stopped")  # an earlier split, listed under the running one
    with LiveServer(create_app(keyed)) as server:
        page = browser.new_page(viewport={"width": 1280, "height": 800})
        page.set_default_timeout(20_000)
        page.on("dialog", lambda dialog: dialog.accept())
        page.goto(server.url + "/admin/login")
        page.fill("input[name=key]", ADMIN)
        page.click("button[type=submit]")
        page.goto(server.url + "/admin/adapters")
        row = page.locator(f"tr[data-version='{version}']")
        assert page.locator("svg.chart").count() == 4
        row.locator("input[name=share]").fill("50")
        row.locator("button[type=submit]").click()
        assert f"{version} now serves 50% of users" in page.inner_text("[role=status]")
        shoot(page, "adapters")

        users = [f"split-{i}" for i in range(12)]
        sides = {ab_bucket(u, version) < 0.5 for u in users}
        assert sides == {True, False}  # these ids land on both sides
        for user in users:
            api(server.url, f"/v1/conversations/{user}-c/messages", {"user_id": user, "text": "Hello! How are you?"})
        page.goto(server.url + "/admin/experiments")
        b_turns = int(page.locator("tr[data-variant='B'] td").nth(4).inner_text())
        a_turns = int(page.locator("tr[data-variant='A'] td").nth(4).inner_text())
        expected_b = sum(ab_bucket(u, version) < 0.5 for u in users)
        assert (a_turns, b_turns) == (len(users) - expected_b, expected_b)
        assert page.inner_text("#decision") == "keep running"  # far below the minimum sample
        assert "stopped" in page.inner_text(f"tr[data-past='{version}']")
        shoot(page, "experiments")

        page.goto(server.url + "/admin/users/split-0")
        assert page.locator("a[href='/admin/conversations/split-0-c']").count() == 1
        shoot(page, "user")
        page.fill("form.erase input[name=confirm]", "split-0")
        page.click("form.erase button[type=submit]")
        assert "Erased split-0" in page.inner_text("[role=status]")
        assert keyed.store.get_conversation("split-0-c") is None and keyed.store.export_user("split-0")["turns"] == []
        shoot(page, "users")

        keyed.faq.import_file(Path(__file__).resolve().parent.parent / "examples" / "faq" / "bikeshop-sample.csv")
        page.goto(server.url + "/admin/faq")
        page.fill("input[name=q]", "when are you open on saturday?")
        page.click("form.filters button[type=submit]")
        assert page.inner_text("#decision") in ("answer", "ground")
        assert page.locator("table.entries tr[data-entry='hours']").count() == 1
        shoot(page, "faq")
        imported = keyed.store.recent_feedback(limit=10)  # "What is my name?" "no" 👎 and a liked reply, on top
        disliked, liked = (next(t for r, t in imported if r.rating == value) for value in (-1, 1))
        keyed.store.rate(turn_id=liked.id, rating=1)
        keyed.store.rate(turn_id=disliked.id, rating=-1, correction="I don't know your name yet. What is it?")
        page.goto(server.url + "/admin/feedback")
        assert page.locator("table.feedback tbody tr[data-turn]").count() >= 24
        page.locator(f"tr[data-turn='{liked.id}'] form[action$='/keep-out'] button").click()
        assert "kept out: the rating teaches no training run" in page.inner_text("[role=status]")
        assert page.locator(f"tr[data-turn='{disliked.id}'] button", has_text="Approve for training").count() == 1
        shoot(page, "feedback")
        page.close()


def test_an_agent_reply_to_a_telegram_conversation_reaches_the_chat(tiny_settings):
    """A Telegram customer handed off; the console's reply goes out through the real python-telegram-bot client
    to the stand-in Bot API server, into the customer's chat."""
    from tests.telegram_standin import Standin

    token, chat = "123:ABC", 1001
    standin = Standin(token=token).start()
    settings = tiny_settings.model_copy(update={"admin_keys": [ADMIN], "api_keys": [PLAIN],
                                                "telegram_bot_token": SecretStr(token),  # as Settings holds it
                                                "telegram_base_url": standin.base_url})
    services = open_services(settings)
    try:
        services.backend.worker.wait_ready(60)
        with TestClient(create_app(services), base_url="http://127.0.0.1") as c:
            conversation = f"telegram:{chat}:1"  # as the Telegram channel names a private chat's first conversation
            # the customer is Telegram's: only an admin key names a channel's ids (tests/test_attacks.py)
            for text in ("Hello", "Can I speak to a real person?"):
                c.post(f"/v1/conversations/{conversation}/messages", headers={"Authorization": f"Bearer {ADMIN}"},
                       json={"user_id": f"telegram:{chat}", "text": text, "channel": "telegram"})
            assert services.store.get_conversation(conversation).status == "human"
            csrf = logged_in(c)
            sent = c.post(f"/admin/conversations/{conversation}/reply",
                          data={"csrf": csrf, "text": "Hi, this is Mia from support. How can I help?"})
            assert "sent to the customer on Telegram" in sent.text
        assert [m.text for m in standin.sent_to(chat)] == ["Hi, this is Mia from support. How can I help?"]
    finally:
        services.close()
        standin.stop()


def test_an_agent_reply_to_a_chatwoot_conversation_is_posted_to_chatwoot(tiny_settings):
    chatwoot_app, calls = recorder_app()
    with LiveServer(chatwoot_app) as chatwoot:
        settings = tiny_settings.model_copy(update={"admin_keys": [ADMIN], "api_keys": [PLAIN],
                                                    "chatwoot_base_url": chatwoot.url, "chatwoot_bot_token": "cw-token"})
        services = open_services(settings)
        try:
            services.backend.worker.wait_ready(60)
            with TestClient(create_app(services), base_url="http://127.0.0.1") as c:
                conversation = "chatwoot:3:41"  # as the Chatwoot channel names account 3's conversation 41
                c.post(f"/v1/conversations/{conversation}/messages", headers={"Authorization": f"Bearer {ADMIN}"},
                       json={"user_id": "chatwoot:3:9", "text": "I need a human agent", "channel": "chatwoot"})
                csrf = logged_in(c)
                sent = c.post(f"/admin/conversations/{conversation}/reply",
                              data={"csrf": csrf, "text": "Hello, Mia here. Let me check your order."})
                assert "sent to the customer in Chatwoot" in sent.text
            posted = [call for call in calls if call["path"] == "/api/v1/accounts/3/conversations/41/messages"
                      and call["json"].get("private") is False]
            assert [p["json"]["content"] for p in posted] == ["Hello, Mia here. Let me check your order."]
            assert posted[0]["headers"]["api_access_token"] == "cw-token"
        finally:
            services.close()


@pytest.fixture(params=["sqlite", "postgresql"])
def any_store(request, tmp_path):
    """The transcript store on SQLite and on PostgreSQL (the console's queries run on both)."""
    from dialogue.store import TranscriptStore

    url = f"sqlite:///{tmp_path / 'console.db'}" if request.param == "sqlite" else request.getfixturevalue("pg_url")
    store = TranscriptStore(url)
    yield store
    store.close()


def test_the_console_queries_on_sqlite_and_postgresql(any_store):
    from datetime import timedelta

    from dialogue.store import Turn, utcnow

    store = any_store
    served(store, "v0001-aaaaaaaa", "q1", [1, 1, -1], latency_ms=120)
    served(store, None, "q2", [-1], latency_ms=80)
    store.ensure_conversation(conversation_id="q3", user_id="user-q3", channel="telegram")
    store.record_turn(Turn(conversation_id="q3", user_id="user-q3", user_text="agent please", reply="", model_id="",
                           finish_reason="handoff", handoff=True, channel="telegram"))
    store.set_status(conversation_id="q3", status="human")
    store.rate(turn_id=store.history(conversation_id="q1", user_id="user-q1")[0].id, rating=-1, correction="Better.")

    ids = lambda rows: {r.conversation.id for r in rows}  # noqa: E731
    assert ids(store.list_conversations()) == {"q1", "q2", "q3"}
    assert ids(store.list_conversations(channel="telegram")) == {"q3"}
    assert ids(store.list_conversations(adapter_version="v0001-aaaaaaaa")) == {"q1"}
    assert ids(store.list_conversations(adapter_version="")) == {"q2", "q3"}
    assert ids(store.list_conversations(rating=0)) == {"q3"} and ids(store.list_conversations(rating=1)) == {"q1"}
    [waiting] = store.list_conversations(status="human")
    assert waiting.waiting and waiting.turns == 1 and waiting.last.user_text == "agent please"
    [q1] = store.list_conversations(user_id="user-q1")
    assert (q1.turns, q1.ups, q1.downs, q1.last.seq) == (3, 1, 2, 3)
    assert [t.seq for t, _ in store.conversation_turns("q1")] == [1, 2, 3]
    assert store.conversation_turns("q1")[0][1].correction == "Better."
    assert store.facets() == {"channels": ["api", "telegram"], "adapter_versions": ["", "v0001-aaaaaaaa"]}
    assert [u for u, _, _ in store.list_users(contains="q3")] == ["user-q3"]
    assert len(store.recent_feedback()) == 4
    outcomes = store.variant_outcomes()
    assert outcomes["v0001-aaaaaaaa"] | {"latencies_ms": []} == {
        "conversations": 1, "turns": 3, "up": 1, "down": 2, "corrections": 1, "handoff_conversations": 0,
        "latencies_ms": []}
    assert outcomes["v0001-aaaaaaaa"]["latencies_ms"] == [120, 120, 120]
    assert outcomes[""]["turns"] == 1  # the waiting customer message is no bot turn
    assert store.variant_outcomes(since=utcnow() + timedelta(minutes=1)) == {}


def test_browser_an_operator_approves_a_correction_and_training_then_learns_it(console, keyed):
    from dialogue.store import Turn
    from training.datasets import build_dataset

    url, page = console
    store = keyed.store
    store.ensure_conversation(conversation_id="fb2", user_id="bea", channel="api")
    turn = store.record_turn(Turn(conversation_id="fb2", user_id="bea", user_text="open sunday?", reply="no idea"))
    store.rate(turn_id=turn.id, rating=-1, correction="Yes, from ten to four.")
    page.goto(url + "/admin/feedback?only=corrections")
    page.click("text=Approve for training")
    page.wait_for_selector("text=approved: the next training run learns from it")
    assert [e.completion for e in build_dataset(store, system="s", heldout_fraction=0.0).train
            if e.source == "correction"] == ["Yes, from ten to four."]
