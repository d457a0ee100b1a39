"""`rapport bench faq` on the harder set: a 59-entry app bank (bench/data/faq_bank_*), scope included.

`faq_bank.jsonl` is the FAQ (five alternates an entry, the training phrasings); `faq_bank_heldout.jsonl` holds
phrasings written differently (typos, indirect wording, long messages with the question in the middle): five an
entry in the `dev` (tune) split, two in `test`; `faq_bank_scope.jsonl` holds messages the FAQ must not answer
(`outside`: general knowledge, other services, things the bot cannot do; `unknown`: the bank's business but not
in the FAQ; `smalltalk`), 180 dev and 90 test. Figures are on `test`; `--calibrate` fits the scope model on `dev`.

Mechanisms, each adding to the one before: plain dense search (question + alternates, cosine), the hybrid
index (answers indexed too, vectors centred, BM25 bonus), and the FAQ's own fit (memory/faq_fit.py): its map,
its entry classifier, and its own fine-tuned encoder (memory/faq_tune.py), each judged by the fit's gate.
"""

from __future__ import annotations

import os
import platform
import re
import tempfile
import time
import uuid
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

from bench.faq import read_jsonl
from memory.faq import FaqIndex, normalise
from memory.faq_fit import FitConfig
from memory.faq_scope import ScopeModel, fit_scope_model

DATA = Path(__file__).resolve().parent / "data"
DECLINED = ("unknown", "outside")
# the goal is ≥ 0.90 declined on held-out messages; 70 dev messages a side make a threshold set at exactly 0.90
# land below it on the test half (0.871 there): a 3-point margin, as for the personal assistant's policy
DECLINE_TARGET = 0.93
MECHANISMS = ("hybrid (centred, answers, BM25)", "+ entry centroid (nearest 0.7 + centroid 0.3)",
              "+ the FAQ's own map", "+ entry classifier (the product)", "+ the FAQ's own encoder (RAPPORT_FAQ_ENCODER=1)")
PRODUCT = MECHANISMS[3]


def load(directory: Path, limit: int | None) -> tuple[list[dict], list[dict], list[dict]]:
    """(entries, held-out phrasings, scope messages); `limit` keeps the first N entries and their messages."""
    entries = read_jsonl(directory / "faq_bank.jsonl")
    held = read_jsonl(directory / "faq_bank_heldout.jsonl")
    scope = read_jsonl(directory / "faq_bank_scope.jsonl")
    if limit:
        entries = entries[:limit]
        kept = {e["id"] for e in entries}
        held = [r for r in held if r["id"] in kept]
        per_kind = max(4, limit)
        scope = [r for kind in ("outside", "unknown", "smalltalk") for r in [x for x in scope if x["expect"] == kind][:per_kind]]
    return entries, held, scope


def plain_scores(index: FaqIndex, queries: np.ndarray) -> np.ndarray:
    """(Q, E) plain dense search: best cosine of each query to an entry's question or alternates, as embedded."""
    snap = index.snapshot()
    rows = snap.kinds != "answer"
    sims = queries @ snap.raw[rows].T  # (Q, N)
    best = np.full((len(queries), len(snap.entries)), -1.0, dtype=np.float32)
    for j, entry in enumerate(snap.owner[rows]):
        best[:, entry] = np.maximum(best[:, entry], sims[:, j])
    return best


def retrieval(index: FaqIndex, rows: list[dict], plain: bool) -> dict:
    """top-1, top-3 and per-query search latency of one mechanism over held-out phrasings."""
    snap = index.snapshot()
    position = {e.id: i for i, e in enumerate(snap.entries)}
    tops, took = [], []
    for row in rows:
        start = time.perf_counter()
        if plain:
            vector = index.embedder.embed([row["question"]])  # uncached: the same work as a real search
            order = np.argsort(-plain_scores(index, vector)[0])[:3]
            top = [snap.entries[i].id for i in order]
        else:
            forget(index)
            top = [hit.id for hit in index.search(row["question"], 3)]
        took.append(time.perf_counter() - start)
        tops.append(top)
    assert all(r["id"] in position for r in rows)
    long = [(t, r) for t, r in zip(tops, rows) if sentences(r["question"])]
    return {"top1": rate(t[0] == r["id"] for t, r in zip(tops, rows)),
            "top3": rate(r["id"] in t for t, r in zip(tops, rows)),
            # messages of more than one sentence, the question among them: the weak spot (issue 18)
            "top1_long": rate(t[0] == r["id"] for t, r in long), "long_n": len(long),
            "search_ms": percentiles(took)}


def forget(index: FaqIndex) -> None:
    """Empty the query caches (the plain embedder's and the FAQ encoder's): every search does the full work."""
    for embedder in (index.embedder, index.snapshot().encoder):
        if embedder is not None:
            embedder._recent.clear()


SENTENCE = re.compile(r"(?<=[.!?])\s+|\s*[\n;]\s*")


def sentences(text: str) -> list[str]:
    """The sentences of a message longer than one, else []."""
    parts = [p.strip() for p in SENTENCE.split(text) if p and p.strip()]
    return parts if len(parts) > 1 else []


def windows(parts: list[str]) -> list[str]:
    """Each two adjacent sentences of a message of three or more (a question and the sentence it leans on)."""
    return [" ".join(parts[i:i + 2]) for i in range(len(parts) - 1)] if len(parts) > 2 else []


def token_vectors(embedder, texts: list[str]) -> list[np.ndarray]:
    """Per text, its MiniLM token embeddings without [CLS]/[SEP], unit length: (T, 384) each."""
    out = embedder.model.encode(texts, output_value="token_embeddings", batch_size=32, show_progress_bar=False)
    return [normalise(t.numpy()[1:-1].astype(np.float32)) for t in out]


def ablation(index: FaqIndex, rows: list[dict]) -> dict:
    """Top-1/top-3 of mechanisms measured but not built (or built and taken apart), over the product's index:
    token-level late interaction (ColBERT-style MaxSim over the wheel's MiniLM token embeddings, each entry
    by its best phrasing), a long message scored by its sentences (the best of them and the whole, or the whole
    averaged with its sentences and sentence pairs), and the entry classifier alone."""
    snap = index.snapshot()
    gold = np.array([[e.id for e in snap.entries].index(r["id"]) for r in rows])
    texts = [r["question"] for r in rows]
    fused = np.stack([index.analyse(snap, t).fused for t in texts])  # (Q, E) the product
    phrasings = np.flatnonzero(snap.kinds != "answer")
    entry_tokens = token_vectors(index.embedder, [snap.texts[i] for i in phrasings])
    maxsim = np.full((len(rows), len(snap.entries)), -1.0)
    for qi, query in enumerate(token_vectors(index.embedder, texts)):
        for tokens, entry in zip(entry_tokens, snap.owner[phrasings]):
            maxsim[qi, entry] = max(maxsim[qi, entry], float((query @ tokens.T).max(axis=1).mean()))
    by_sentence, by_window = fused.copy(), fused.copy()
    for qi, text in enumerate(texts):
        parts = sentences(text)
        if not parts:
            continue
        scored = np.stack([index.analyse(snap, p).fused for p in parts + windows(parts)])  # (P, E)
        by_sentence[qi] = np.maximum(fused[qi], scored[: len(parts)].max(0))
        by_window[qi] = 0.5 * fused[qi] + 0.5 * scored.mean(0)
    out = {"product": fused, "token MaxSim alone": maxsim, "product + 0.5 token MaxSim": fused + 0.5 * maxsim,
           "product, best of message and its sentences": by_sentence,
           "product, 0.5 message + 0.5 mean of its sentences and sentence pairs": by_window}
    if snap.classifier is not None:
        vectors = index.embedder.embed(texts)
        out["entry classifier alone"] = snap.classifier.probabilities(texts, vectors)
    long = np.array([bool(sentences(t)) for t in texts])

    def top(scores: np.ndarray) -> dict:
        return {"top1": rate(scores.argmax(1) == gold), "top3": rate(g in np.argsort(-x)[:3] for x, g in zip(scores, gold)),
                "top1_long": rate(scores[long].argmax(1) == gold[long])}

    report = {name: top(scores) for name, scores in out.items()}
    report["long messages (more than one sentence)"] = int(long.sum())
    return report


def rate(flags) -> float:
    flags = list(flags)
    return round(sum(flags) / len(flags), 3) if flags else 0.0


def percentiles(seconds: list[float]) -> dict:
    return {"p50": round(1000 * float(np.percentile(seconds, 50)), 2),
            "p95": round(1000 * float(np.percentile(seconds, 95)), 2)}


def policy(index: FaqIndex, held: list[dict], scope: list[dict]) -> dict:
    """The customer-service policy (`FaqIndex.classify`) on in-scope and out-of-scope messages."""
    took = []

    def level(text: str):
        forget(index)
        start = time.perf_counter()
        decision = index.classify(text)
        took.append(time.perf_counter() - start)
        return decision

    ins = [(r, level(r["question"])) for r in held]
    outs = [(r, level(r["question"])) for r in scope]
    right = [d.level in ("answer", "ground") and d.hits and d.hits[0].id == r["id"] for r, d in ins]
    # a grounded reply is given every entry in its sources (the top 3): the right one among them is what the model
    # had to go on, not that it picked it; `right_entry` (the right entry first) stays the headline figure
    in_sources = [r["id"] in {s["id"] for s in d.sources()} for r, d in ins]
    answered = [(r, d) for r, d in ins if d.level == "answer"]
    by = lambda kind: [d for r, d in outs if r["expect"] == kind]  # noqa: E731
    share = lambda ds, levels: rate(d.level in levels for d in ds)  # noqa: E731
    correct = right + [d.level in DECLINED for r, d in outs if r["expect"] in DECLINED] + \
        [d.level == "smalltalk" for d in by("smalltalk")]
    return {
        "accuracy": rate(correct),
        "in_scope": {"n": len(ins), "right_entry": rate(right), "right_entry_in_sources": rate(in_sources),
                     **{lv: share([d for _, d in ins], (lv,)) for lv in ("answer", "ground", "unknown", "outside", "smalltalk")},
                     "answer_precision": rate(d.hits[0].id == r["id"] for r, d in answered) if answered else None},
        "outside": {"n": len(by("outside")), "declined": share(by("outside"), DECLINED),
                    **{lv: share(by("outside"), (lv,)) for lv in ("outside", "unknown", "ground", "answer", "smalltalk")}},
        "in_domain_not_covered": {"n": len(by("unknown")), "declined": share(by("unknown"), DECLINED),
                                  **{lv: share(by("unknown"), (lv,)) for lv in ("unknown", "outside", "ground", "answer")}},
        "small_talk": {"n": len(by("smalltalk")), "in_kind": share(by("smalltalk"), ("smalltalk",))},
        "out_of_scope_declined": share(by("outside") + by("unknown"), DECLINED),
        "classify_ms": percentiles(took),
    }


def open_policy(index: FaqIndex, held: list[dict], scope: list[dict]) -> dict:
    """The personal-assistant policy (`FaqIndex.decide`, before scope): what reaches the model."""
    ins = [index.decide(r["question"]) for r in held]
    outs = [(r, index.decide(r["question"])) for r in scope if r["expect"] != "smalltalk"]
    return {"in_scope_right_entry": rate(d.level in ("answer", "ground") and d.hits[0].id == r["id"]
                                         for r, d in zip(held, ins)),
            "out_of_scope_declined": rate(d.level == "unknown" for _, d in outs),
            "out_of_scope_to_the_model": rate(d.level in ("none", "ground") for _, d in outs)}


def labelled(index: FaqIndex, held: list[dict], scope: list[dict]) -> list[tuple[tuple[float, ...], str, bool]]:
    """(scope features, label, top entry right) per message: held-out phrasings are `covered`."""
    snap = index.snapshot()
    out = []
    for r in held + scope:
        analysis = index.analyse(snap, r["question"])
        top = snap.entries[int(np.argmax(analysis.fused))].id
        out.append((index.scope_features(snap, analysis, r["question"]), "covered" if "id" in r else r["expect"],
                    r.get("id") == top))
    return out


def calibrate(rows: list[tuple[tuple[float, ...], str, bool]]) -> ScopeModel:
    """Fit the scope model on dev messages, then the loosest answer gate whose verbatim answers are ≥ 95 % right."""
    model = fit_scope_model([(f, label) for f, label, _ in rows])
    # covered_from: the lowest P(covered) a reply from the FAQ needs, the smallest that declines ≥ DECLINE_TARGET of
    # the out-of-scope dev messages (declining costs a handoff; answering outside the FAQ costs a made-up fact)
    right = lambda m: rate(m.scope(f)[0] == "covered" and ok for f, label, ok in rows if label == "covered")  # noqa: E731
    declined = lambda m: rate(m.scope(f)[0] in DECLINED for f, label, _ in rows if label in DECLINED)  # noqa: E731
    grid = [replace(model, covered_from=round(float(t), 2)) for t in np.arange(0.0, 0.96, 0.02)]
    model = max((m for m in grid if declined(m) >= DECLINE_TARGET), key=lambda m: (right(m), -m.covered_from), default=grid[-1])
    best = (-1, 0.99, 0.2)
    for answer_from in np.arange(0.3, 1.0, 0.02):
        for answer_margin in (0.0, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15):
            picked = [ok for f, _, ok in rows if model.scope(f)[0] == "covered" and model.scope(f)[1] >= answer_from
                      and f[1] >= answer_margin]
            if picked and sum(picked) / len(picked) >= 0.95 and sum(picked) > best[0]:
                best = (sum(picked), round(float(answer_from), 2), answer_margin)
    return replace(model, answer_from=best[1], answer_margin=best[2])


def second_business(client, embedder, fit_dir: Path) -> list[tuple[tuple[float, ...], str, bool]]:
    """Calibration rows from examples/faq (a bike shop), so the scope model is not fitted to one business."""
    from bench.faq import EXAMPLES

    index = FaqIndex(client, embedder, collection=f"faq-bench-{uuid.uuid4().hex[:8]}", fit_dir=fit_dir)
    index.import_file(EXAMPLES / "bikeshop.jsonl")
    half = lambda name: [r for r in read_jsonl(EXAMPLES / name) if r["split"] == "calibration"]  # noqa: E731
    # its "none" messages mix small talk with personal and general ones: only its business questions are used
    return labelled(index, half("paraphrases.jsonl"), [r for r in half("out_of_scope.jsonl") if r["expect"] == "unknown"])


def cpu_path(threads: int) -> dict:
    import torch

    return {"torch": torch.__version__, "isa": torch.backends.cpu.get_cpu_capability(), "threads": threads,
            "machine": platform.machine(), "cpus": os.cpu_count(), "load_average": [round(x, 2) for x in os.getloadavg()]}


def run(directory: Path | None = None, *, do_calibrate: bool = False, threads: int = 1, limit: int | None = None) -> dict:
    import chromadb
    import torch

    from memory.embeddings import shared_embedder

    torch.set_num_threads(threads)
    directory = Path(directory or DATA)
    entries, held, scope = load(directory, limit)
    test = lambda rows: [r for r in rows if r["split"] == "test"]  # noqa: E731
    dev = lambda rows: [r for r in rows if r["split"] == "dev"]  # noqa: E731
    from memory.faq_files import make_entry

    faq = [make_entry(e["id"], e["question"], e["answer"], e.get("tags") or (), e.get("alternates") or ()) for e in entries]
    client = chromadb.EphemeralClient()
    embedder = shared_embedder()
    new = lambda **kw: FaqIndex(client, embedder, collection=f"faq-bench-{uuid.uuid4().hex[:8]}", **kw)  # noqa: E731
    hybrid = new(nearest_weight=1.0)
    hybrid.upsert(faq)
    centroid = new()
    centroid.upsert(faq)
    with tempfile.TemporaryDirectory() as fit_dir:
        mapped = new(fit_dir=Path(fit_dir) / "map", fit_config=FitConfig(classifier=False, encoder=False))
        mapped.upsert(faq)
        classified = new(fit_dir=Path(fit_dir) / "classifier", fit_config=FitConfig(encoder=False))
        classified.upsert(faq)
        fitted = new(fit_dir=Path(fit_dir) / "full", fit_config=FitConfig(encoder=True))  # RAPPORT_FAQ_ENCODER=1
        start = time.perf_counter()
        fitted.upsert(faq)  # imports, then fits the encoder, the map and the entry classifier
        import_and_fit_s = time.perf_counter() - start  # with the encoder: the longest fit
        fit = classified.snapshot().fit
        indexes = (hybrid, centroid, mapped, classified, fitted)
        if do_calibrate:
            model = calibrate(labelled(classified, dev(held), dev(scope)) + second_business(client, embedder, Path(fit_dir)))
            for index in indexes:
                index.scope_model = model
        for index in indexes:
            index.snapshot()
        split = lambda name: {  # noqa: E731
            "plain dense": {"retrieval": retrieval(hybrid, name(held), plain=True)},
            **{label: {"retrieval": retrieval(index, name(held), plain=False), "policy": policy(index, name(held), name(scope))}
               for label, index in zip(MECHANISMS, indexes)}}
        report = {
            "faq": {"entries": len(faq), "phrasings_per_entry": round(np.mean([1 + len(e.alternates) for e in faq]), 2),
                    "held_out_test": len(test(held)), "scope_test": len(test(scope))},
            "fit": fit.to_json() if fit else None,
            "fit_with_encoder": fitted.snapshot().fit.to_json() if fitted.snapshot().fit else None,
            "import_and_fit_s": round(import_and_fit_s, 2),
            "scope_model": asdict(classified.scope_model),
            "calibrated_now": do_calibrate,
            "mechanisms": split(test),
            "mechanisms_dev": split(dev),
            "ablation_dev": ablation(classified, dev(held)),
            "ablation_test": ablation(classified, test(held)),
            "before_scope (open policy, hybrid)": open_policy(hybrid, test(held), test(scope)),
            "cpu": cpu_path(threads),
        }
    best = report["mechanisms"][PRODUCT]
    report["top1_accuracy"] = best["retrieval"]["top1"]
    report["out_of_scope_declined"] = best["policy"]["out_of_scope_declined"]
    report["in_scope_right_entry"] = best["policy"]["in_scope"]["right_entry"]
    report["search_p95_ms"] = best["retrieval"]["search_ms"]["p95"]
    return report


def run_api(open_services, create_app, *, limit: int | None = None, threads: int = 1) -> dict:
    """Every test message as the first message of a new conversation through the native API (the FastAPI app
    in-process, the configured model: the embedded SmolLM2 by default), with the bank FAQ imported.

    `open_services` and `create_app` come from the caller (bot/cli/bench.py): the bench room sits below bot."""
    import torch
    from fastapi.testclient import TestClient

    from dialogue.settings import Settings
    from memory.faq_files import make_entry
    from memory.faq_scope import OUTSIDE_REPLY, SMALL_TALK_REPLIES
    from memory.faq_text import UNKNOWN_REPLY

    torch.set_num_threads(threads)
    entries, held, scope = load(DATA, limit)
    test = lambda rows: [r for r in rows if r["split"] == "test"]  # noqa: E731
    with tempfile.TemporaryDirectory() as home:
        settings = Settings()  # the model and its cache as configured; stores in a throw-away home
        settings = settings.model_copy(update={"home": Path(home), "api_keys": [], "admin_keys": []})
        models = Settings().models_dir
        (Path(home) / "models").symlink_to(models, target_is_directory=True) if models.exists() else None
        services = open_services(settings)
        try:
            services.faq.upsert([make_entry(e["id"], e["question"], e["answer"], e.get("tags") or (),
                                            e.get("alternates") or ()) for e in entries])
            topics = services.faq.classify("hello").topics
            fixed_declines = {UNKNOWN_REPLY, OUTSIDE_REPLY.format(topics=topics)}
            small_talk = {r.format(topics=topics) for r in SMALL_TALK_REPLIES.values()}
            answers = {e["id"]: e["answer"] for e in entries}
            with TestClient(create_app(services, open_api=True), base_url="http://127.0.0.1") as client:
                def say(text: str) -> tuple[dict, float]:
                    start = time.perf_counter()
                    response = client.post(f"/v1/conversations/bench-{uuid.uuid4().hex[:12]}/messages",
                                           json={"user_id": f"u-{uuid.uuid4().hex[:8]}", "text": text})
                    response.raise_for_status()
                    return response.json(), time.perf_counter() - start

                took, ins, outs = [], [], []
                for r in test(held):
                    body, s = say(r["question"])
                    took.append(s)
                    faq = [x["id"] for x in body["sources"] if x["kind"] == "faq"]
                    ins.append({"right": bool(faq) and faq[0] == r["id"], "in_sources": r["id"] in faq,
                                "verbatim": body["reply"] == answers[r["id"]],
                                "model": body["usage"]["completion_tokens"] > 0})
                for r in test(scope):
                    body, s = say(r["question"])
                    took.append(s)
                    outs.append({"expect": r["expect"], "declined": body["reply"] in fixed_declines,
                                 "small_talk": body["reply"] in small_talk, "handoff": body["handoff"],
                                 "model": body["usage"]["completion_tokens"] > 0})
        finally:
            services.close()
    oos = [o for o in outs if o["expect"] != "smalltalk"]
    chat = [o for o in outs if o["expect"] == "smalltalk"]
    return {"in_scope": {"n": len(ins), "right_entry": rate(i["right"] for i in ins),
                         "right_entry_in_sources": rate(i["in_sources"] for i in ins),
                         "verbatim_answer": rate(i["verbatim"] for i in ins), "model_called": rate(i["model"] for i in ins)},
            "outside": {"n": sum(o["expect"] == "outside" for o in outs),
                        "declined": rate(o["declined"] for o in oos if o["expect"] == "outside")},
            "in_domain_not_covered": {"n": sum(o["expect"] == "unknown" for o in outs),
                                      "declined": rate(o["declined"] for o in oos if o["expect"] == "unknown")},
            "out_of_scope_declined": rate(o["declined"] for o in oos),
            "out_of_scope_model_called": rate(o["model"] for o in oos),
            "small_talk": {"n": len(chat), "in_kind": rate(o["small_talk"] for o in chat)},
            "turn_ms": percentiles(took), "cpu": cpu_path(threads)}
