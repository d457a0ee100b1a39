"""Customer-service scope through the real HTTP app, the FAQ's own fit and its versioning, `bench faq` on a slice."""

from __future__ import annotations

import json
import uuid
from dataclasses import replace
from pathlib import Path

import chromadb
import pytest
from click.testing import CliRunner
from fastapi.testclient import TestClient

from bench.faq_bank import MECHANISMS, PRODUCT
from memory.faq import FaqIndex
from memory.faq_files import make_entry
from memory.faq_fit import FitConfig
from memory.faq_scope import OUTSIDE_REPLY, SMALL_TALK_REPLIES
from memory.faq_text import UNKNOWN_REPLY

BANK = Path(__file__).resolve().parent.parent / "bench" / "data" / "faq_bank.jsonl"


def bank_entries(n: int | None = None) -> list:
    rows = [json.loads(line) for line in BANK.read_text().splitlines()][:n]
    return [make_entry(r["id"], r["question"], r["answer"], r["tags"], r["alternates"]) for r in rows]


def fitted_index(embedder, tmp_path: Path, **kwargs) -> FaqIndex:
    return FaqIndex(chromadb.PersistentClient(str(tmp_path / "chroma")), embedder, fit_dir=tmp_path / "faq_fit",
                    collection=f"faq-{uuid.uuid4().hex[:8]}", **kwargs)


# -- the FAQ's own fit ----------------------------------------------------------------------------------


def test_a_fit_is_versioned_with_the_faq_and_reused_while_it_is_unchanged(embedder, tmp_path):
    # the map's versioning; the FAQ's own encoder is versioned the same way (tests/test_faq_tune.py)
    index = fitted_index(embedder, tmp_path, fit_config=FitConfig(encoder=False))
    entries = bank_entries(12)
    index.upsert(entries)
    first = index.last_fit
    assert first.trained and first.used and first.fitted_top1 > first.plain_top1 and first.held_out == 12
    meta = tmp_path / "faq_fit" / first.fingerprint / "fit_meta.json"
    assert (meta.parent / "adapter.npy").exists() and json.loads(meta.read_text())["used"] is True
    assert index.snapshot().weight is not None and index.snapshot().fit.fingerprint == first.fingerprint
    written = meta.stat().st_mtime_ns

    index.upsert(entries)  # unchanged: not retrained
    assert not index.last_fit.trained and index.last_fit.fingerprint == first.fingerprint
    assert meta.stat().st_mtime_ns == written
    reopened = FaqIndex(index.client, embedder, collection=index.name, fit_dir=tmp_path / "faq_fit",
                        fit_config=FitConfig(encoder=False))
    assert reopened.snapshot().fit.fingerprint == first.fingerprint and reopened.snapshot().weight is not None
    assert [h.id for h in reopened.search("tapped my card on the bus and it didnt go", 3)] == \
        [h.id for h in index.search("tapped my card on the bus and it didnt go", 3)]

    changed = entries[:-1] + [replace(entries[-1], alternates=entries[-1].alternates + ["Top-up failed again"])]
    index.upsert(changed)  # a changed FAQ is a new version: retrained
    assert index.last_fit.trained and index.last_fit.fingerprint != first.fingerprint
    assert (tmp_path / "faq_fit" / index.last_fit.fingerprint / "fit_meta.json").exists() and meta.exists()
    index.delete(entries[0].id)
    assert index.last_fit.trained and index.snapshot().fit.fingerprint == index.last_fit.fingerprint


def test_a_worse_fit_is_not_used(embedder, tmp_path):
    # a negative temperature trains the map to push each entry's phrasings apart: a real, bad fit
    # (the entry classifier and the encoder off: each is judged on its own, tests/test_faq_classifier.py and
    # tests/test_faq_tune.py)
    index = fitted_index(embedder, tmp_path, fit_config=FitConfig(temperature=-0.05, lr=0.05, steps=100,
                                                                  classifier=False, encoder=False))
    index.upsert(bank_entries(12))
    fit = index.last_fit
    assert fit.trained and not fit.used and fit.fitted_top1 < fit.plain_top1
    assert not (tmp_path / "faq_fit" / fit.fingerprint / "adapter.npy").exists()
    assert index.snapshot().weight is None
    plain = FaqIndex(chromadb.EphemeralClient(), embedder, collection=f"faq-{uuid.uuid4().hex[:8]}")
    plain.upsert(bank_entries(12))
    query = "is there a limit on free cash withdrawls per month"
    assert [(h.id, round(h.score, 5)) for h in index.search(query, 3)] == \
        [(h.id, round(h.score, 5)) for h in plain.search(query, 3)]
    index.upsert(bank_entries(12))  # the rejected fit is remembered, not retrained
    assert not index.last_fit.trained and not index.last_fit.used


def test_a_faq_without_alternates_is_not_fitted(embedder, tmp_path):
    index = fitted_index(embedder, tmp_path)
    index.upsert([replace(e, alternates=[]) for e in bank_entries(10)])
    assert not index.last_fit.used and "too few phrasings" in index.last_fit.reason
    assert index.snapshot().weight is None


# -- scope through the HTTP app -------------------------------------------------------------------------


@pytest.fixture
def services(tiny_settings):
    """The tiny model (what is tested here never reaches it, or only has to), the real embedder and stores."""
    from bot.services import open_services

    opened = open_services(tiny_settings)
    opened.backend.worker.wait_ready(60)
    yield opened
    opened.close()


@pytest.fixture
def bank_client(services):
    services.faq.upsert(bank_entries())
    fit = services.faq.snapshot().fit
    assert fit.used or fit.encoder_used  # the map or the FAQ's own encoder: something beat the plain embedder
    from bot.http.app import create_app

    services.settings.admin_keys = ["bank-operator-key-0123"]  # its agents' replies are trusted (FAQ phrasings)
    with TestClient(create_app(services), base_url="http://127.0.0.1",
                    headers={"Authorization": "Bearer bank-operator-key-0123"}) as client:
        yield client


def first_message(client, text: str) -> dict:
    conversation = f"c-{uuid.uuid4().hex[:10]}"
    response = client.post(f"/v1/conversations/{conversation}/messages", json={"user_id": "cust", "text": text})
    assert response.status_code == 200, response.text
    return {**response.json(), "conversation": conversation}


def test_business_scope_through_the_api(bank_client, services):
    topics = services.faq.classify("hi").topics
    assert topics == "card, account, security, payments and fees"  # its five commonest tags

    for text in ("What is the capital of Australia?", "tell me how long until the nascar race begins",
                 "Can you recommend a good pizza place nearby?"):
        body = first_message(bank_client, text)
        assert body["reply"] == OUTSIDE_REPLY.format(topics=topics), text  # declined, a person offered
        assert body["usage"]["completion_tokens"] == 0 and not any(s["kind"] == "faq" for s in body["sources"])
        assert not body["handoff"] and services.store.get_turn(body["turn_id"]).reply == body["reply"]

    body = first_message(bank_client, "Do you offer mortgages?")  # the bank's business, not in the FAQ
    assert body["reply"] == UNKNOWN_REPLY and body["handoff"] and body["usage"]["completion_tokens"] == 0
    assert services.store.get_conversation(body["conversation"]).status == "human"

    for text, entry in (("I have lost my card, what should I do?", "card-lost"),
                        ("how do i cancel a direct debit", "direct-debit")):
        body = first_message(bank_client, text)
        assert body["sources"][0] == {"kind": "faq", "id": entry, "score": body["sources"][0]["score"]}
        assert body["reply"] == services.faq.get(entry).answer and body["usage"]["completion_tokens"] == 0

    for text, kind in (("hi there", "greeting"), ("thanks!", "thanks"), ("bye", "goodbye")):
        body = first_message(bank_client, text)
        assert body["reply"] == SMALL_TALK_REPLIES[kind].format(topics=topics), text
        assert not body["handoff"] and body["usage"]["completion_tokens"] == 0


def test_the_personal_assistant_stays_free_to_chat(bank_client, services):
    services.settings.scope = "open"
    body = first_message(bank_client, "What is the capital of Australia?")
    assert body["usage"]["completion_tokens"] > 0 and not body["handoff"]  # the model answers, as before


# -- the benchmark --------------------------------------------------------------------------------------


def test_bench_faq_on_a_slice():
    from bot.cli.bench import bench

    result = CliRunner().invoke(bench, ["faq", "--limit", "8", "--json"], catch_exceptions=False)
    report = json.loads(result.output)
    assert report["faq"]["entries"] == 8 and report["faq"]["phrasings_per_entry"] == 6.0
    assert report["fit"]["held_out"] == 8
    mechanisms = report["mechanisms"]
    assert set(mechanisms) == {"plain dense", *MECHANISMS} == set(report["mechanisms_dev"])
    for figures in mechanisms.values():
        assert 0.5 <= figures["retrieval"]["top1"] <= figures["retrieval"]["top3"] <= 1.0
        assert 0 < figures["retrieval"]["search_ms"]["p50"] <= figures["retrieval"]["search_ms"]["p95"]
        assert 0.0 <= figures["retrieval"]["top1_long"] <= 1.0
    # the tune split has long messages of its own (two an entry), not only the held-out one
    assert report["mechanisms_dev"][PRODUCT]["retrieval"]["long_n"] >= 16
    policy = mechanisms[PRODUCT]["policy"]
    assert policy["in_scope"]["n"] == 16 and policy["outside"]["n"] == 4 and policy["small_talk"]["n"] == 4
    assert policy["outside"]["declined"] >= 0.75 and policy["small_talk"]["in_kind"] >= 0.75
    in_scope = policy["in_scope"]  # the right entry first is one way of having it among the sources
    assert 0.0 <= in_scope["right_entry"] <= in_scope["right_entry_in_sources"] <= 1.0
    assert in_scope["right_entry_in_sources"] <= in_scope["answer"] + in_scope["ground"] + 0.002  # rounding
    assert report["cpu"]["isa"] and report["top1_accuracy"] == mechanisms[PRODUCT]["retrieval"]["top1"]
    for ablation, rows in (("ablation_dev", "mechanisms_dev"), ("ablation_test", "mechanisms")):
        maxsim = report[ablation]["token MaxSim alone"]
        assert 0.0 <= maxsim["top1"] <= maxsim["top3"] <= 1.0
        assert report[ablation]["product"]["top1"] == report[rows][PRODUCT]["retrieval"]["top1"]
        assert report[ablation]["product"]["top1_long"] == report[rows][PRODUCT]["retrieval"]["top1_long"]


# -- learning from resolved conversations ---------------------------------------------------------------


def test_an_agent_answered_message_becomes_a_phrasing_after_review(bank_client, services):
    from training.faq_phrasings import approve, candidates, reject

    home = services.settings.home
    before = services.faq.snapshot().fingerprint
    body = first_message(bank_client, "the atm ate my card")
    entry = services.faq.get("card-lost")
    agent = bank_client.post(f"/v1/conversations/{body['conversation']}/agent_messages",
                             json={"text": "Sorry about that! " + entry.answer})
    assert agent.status_code == 200, agent.text
    other = first_message(bank_client, "what's the weather like on mars")
    bank_client.post(f"/v1/conversations/{other['conversation']}/agent_messages", json={"text": "No idea, sorry!"})

    found = {c.customer_text: c for c in candidates(services.store, services.faq, home)}
    mine = found["the atm ate my card"]
    assert mine.entry_id == "card-lost" and mine.score >= 0.75
    assert found["what's the weather like on mars"].entry_id is None
    with pytest.raises(Exception, match="name one with --entry"):
        approve(services.store, services.faq, home, found["what's the weather like on mars"].turn_id)
    reject(services.store, services.faq, home, found["what's the weather like on mars"].turn_id)

    result = approve(services.store, services.faq, home, mine.turn_id)
    assert result["entry_id"] == "card-lost" and result["updated"] == 1
    assert services.faq.get("card-lost").alternates[-1] == mine.customer_text
    assert services.faq.last_fit.trained and services.faq.snapshot().fingerprint != before  # refitted
    assert candidates(services.store, services.faq, home) == []  # approved one is a phrasing, the other rejected
