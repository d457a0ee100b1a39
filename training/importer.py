"""`rapport transcripts import|export`: historical conversations as JSONL, in and out of the transcript store.

A line is `{"conversation_id", "user_id", "turns": [{"role": "user"|"assistant", "text", "rating"?: 1|-1,
"correction"?: "better reply"}]}`. Each assistant message becomes a turn answering the user messages
before it, with the prompt parts rebuilt from the history, so training sees them like live turns. Turn ids
are derived from the conversation and position, so importing a file twice adds nothing the second time.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from dialogue.prompt import PromptParts
from dialogue.store import TranscriptStore, Turn
from memory.errors import InvalidInput
from memory.text import clean_text, validate_id
from training.store import TrainingStore

logger = logging.getLogger(__name__)

MAX_LINE_BYTES = 1_000_000
MAX_TURNS = 500
HISTORY_MESSAGES = 8  # what an imported turn's prompt keeps of the conversation before it
IMPORT_MODEL_ID = "import"


@dataclass
class ImportReport:
    conversations: int = 0
    turns: int = 0
    ratings: int = 0
    unchanged: int = 0
    errors: list[dict[str, Any]] = field(default_factory=list)  # {"line", "error"}

    def to_json(self) -> dict[str, Any]:
        return {"conversations": self.conversations, "turns": self.turns, "ratings": self.ratings,
                "unchanged": self.unchanged, "errors": self.errors}


@dataclass(frozen=True)
class ImportedTurn:
    user_text: str
    reply: str
    history: list[dict[str, str]]
    rating: int | None
    correction: str | None


def parse_line(raw: bytes, max_chars: int) -> tuple[str, str, list[ImportedTurn]]:
    """(conversation_id, user_id, turns) from one JSONL line; InvalidInput says what is wrong with it."""
    if len(raw) > MAX_LINE_BYTES:
        raise InvalidInput(f"line is over {MAX_LINE_BYTES} bytes")
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise InvalidInput("not UTF-8") from None
    except ValueError as exc:
        raise InvalidInput(f"not JSON ({exc.msg})") from None
    if not isinstance(data, dict):
        raise InvalidInput("a line must be a JSON object")
    conversation_id = validate_id(data.get("conversation_id"), "conversation_id")
    user_id = validate_id(data.get("user_id"), "user_id")
    messages = data.get("turns")
    if not isinstance(messages, list) or not messages:
        raise InvalidInput("turns must be a non-empty list")
    if len(messages) > MAX_TURNS:
        raise InvalidInput(f"more than {MAX_TURNS} turns")
    return conversation_id, user_id, list(pair_turns(messages, max_chars))


def _text(value: object, max_chars: int, what: str) -> str:
    text = clean_text(value, what)
    if len(text) > max_chars:
        raise InvalidInput(f"{what} is over {max_chars} characters")
    return text


def pair_turns(messages: list[Any], max_chars: int) -> Iterator[ImportedTurn]:
    """Each assistant message with the user message(s) it answers and the history before them."""
    history: list[dict[str, str]] = []
    pending: list[str] = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ("user", "assistant"):
            raise InvalidInput(f"turn {index}: role must be 'user' or 'assistant'")
        text = _text(message.get("text"), max_chars, f"turn {index} text")
        if message["role"] == "user":
            pending.append(text)
            continue
        rating = message.get("rating")
        if rating is not None and (isinstance(rating, bool) or rating not in (1, -1)):
            raise InvalidInput(f"turn {index}: rating must be 1 or -1")
        correction = message.get("correction")
        correction = _text(correction, max_chars, f"turn {index} correction") if correction is not None else None
        if not pending:  # an assistant message nobody asked for (a greeting): context only
            history.append({"role": "assistant", "content": text})
            continue
        user_text = "\n".join(pending)
        yield ImportedTurn(user_text=user_text, reply=text, history=_window(history), rating=rating,
                           correction=correction)
        history += [{"role": "user", "content": user_text}, {"role": "assistant", "content": text}]
        pending = []


def _window(history: list[dict[str, str]]) -> list[dict[str, str]]:
    kept = history[-HISTORY_MESSAGES:]
    while kept and kept[0]["role"] != "user":  # like fit_history: never start with an answer to nothing
        kept = kept[1:]
    return kept


def turn_id_for(conversation_id: str, index: int) -> str:
    return "imp-" + hashlib.sha256(f"{conversation_id}\x00{index}".encode()).hexdigest()[:28]


def import_lines(store: TranscriptStore, lines: Iterable[bytes], *, system: str, max_chars: int) -> ImportReport:
    """Write every valid line into the store; bad lines are reported by number and skipped."""
    report = ImportReport()
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            conversation_id, user_id, turns = parse_line(raw.rstrip(b"\r\n"), max_chars)
            store.ensure_conversation(conversation_id=conversation_id, user_id=user_id, channel="import")
            _write_conversation(store, report, conversation_id, user_id, turns, system)
        except InvalidInput as exc:
            report.errors.append({"line": number, "error": str(exc)})
    return report


def _write_conversation(store: TranscriptStore, report: ImportReport, conversation_id: str, user_id: str,
                        turns: list[ImportedTurn], system: str) -> None:
    added = 0
    for index, item in enumerate(turns):
        turn_id = turn_id_for(conversation_id, index)
        if store.get_turn(turn_id) is not None:
            report.unchanged += 1
            continue
        parts = PromptParts(system=system, user_text=item.user_text, history=item.history)
        store.record_turn(Turn(id=turn_id, conversation_id=conversation_id, user_id=user_id, channel="import",
                               user_text=item.user_text, reply=item.reply,
                               prompt=json.dumps(parts.to_dict(), ensure_ascii=False), model_id=IMPORT_MODEL_ID))
        added += 1
        report.turns += 1
        if item.rating is not None or item.correction:
            # A correction without a verdict says the reply was wrong.
            rating = item.rating if item.rating is not None else -1
            store.rate(turn_id=turn_id, rating=rating, user_id=user_id, correction=item.correction,
                       trusted=True)  # the operator's own file
            report.ratings += 1
    if added:
        report.conversations += 1


def export_conversations(store: TranscriptStore) -> Iterator[dict[str, Any]]:
    """Every conversation in the import format, oldest first (agent replies included as assistant turns)."""
    reader = TrainingStore(store)
    for conversation in reader.conversations():
        rows = reader.conversation_turns(conversation.id)
        messages: list[dict[str, Any]] = []
        for turn, rating in rows:
            messages.append({"role": "user", "text": turn.user_text})
            if not turn.reply:
                continue
            message: dict[str, Any] = {"role": "assistant", "text": turn.reply}
            if rating is not None:
                message["rating"] = rating.rating
                if rating.correction:
                    message["correction"] = rating.correction
            messages.append(message)
        if messages:
            yield {"conversation_id": conversation.id, "user_id": conversation.user_id, "turns": messages}
