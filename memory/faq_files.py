"""FAQ entries and the three file formats they come in: CSV, JSONL and Markdown (see SPEC `faq import`).

A file is validated whole before anything is stored: every problem is reported with its line number and a
file with any problem imports nothing.
"""

from __future__ import annotations

import csv
import io
import json
import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

from memory.errors import InvalidInput

MAX_FILE_BYTES = 20 * 1024 * 1024
MAX_ENTRIES = 10_000
MAX_ID_CHARS = 64
MAX_QUESTION_CHARS = 500
MAX_ANSWER_CHARS = 4_000
MAX_ALTERNATES = 30
MAX_TAGS = 20
MAX_TAG_CHARS = 40
MAX_ERRORS_SHOWN = 5

ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]*")
CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
HEADING_ID = re.compile(r"\s*\{#([^}\s]*)\}\s*$")
TAGS_LINE = re.compile(r"^tags:\s*(.*)$", re.IGNORECASE)
SUFFIXES = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".md": "markdown", ".markdown": "markdown"}


@dataclass(frozen=True)
class FaqEntry:
    """One question of the business FAQ: its answer is the source of truth for replies."""

    id: str
    question: str
    answer: str
    tags: list[str] = field(default_factory=list)
    alternates: list[str] = field(default_factory=list)  # other phrasings of the question

    def to_json(self) -> dict:
        return {"id": self.id, "question": self.question, "answer": self.answer, "tags": list(self.tags),
                "alternates": list(self.alternates)}


def clean_line(text: str, what: str, limit: int) -> str:
    """One line of text: whitespace collapsed, no control characters, not empty, not over `limit`."""
    if not isinstance(text, str):
        raise ValueError(f"{what} must be text")
    text = " ".join(unicodedata.normalize("NFC", text).split())
    if CONTROL.search(text):
        raise ValueError(f"{what} contains control characters")
    if not text:
        raise ValueError(f"empty {what}")
    if len(text) > limit:
        raise ValueError(f"{what} is {len(text)} characters (limit {limit})")
    return text


def clean_answer(text: str) -> str:
    if not isinstance(text, str):
        raise ValueError("answer must be text")
    lines = [" ".join(line.split()) for line in unicodedata.normalize("NFC", text).replace("\r\n", "\n").split("\n")]
    text = re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()
    if CONTROL.search(text):
        raise ValueError("answer contains control characters")
    if not text:
        raise ValueError("empty answer")
    if len(text) > MAX_ANSWER_CHARS:
        raise ValueError(f"answer is {len(text)} characters (limit {MAX_ANSWER_CHARS})")
    return text


def make_entry(entry_id: object, question: object, answer: object, tags: object = (),
               alternates: object = ()) -> FaqEntry:
    """A validated entry; ValueError says what is wrong in words fit for a user."""
    if isinstance(entry_id, int) and not isinstance(entry_id, bool):
        entry_id = str(entry_id)
    if not isinstance(entry_id, str) or not entry_id.strip():
        raise ValueError("missing id")
    entry_id = entry_id.strip()
    if len(entry_id) > MAX_ID_CHARS or not ID_PATTERN.fullmatch(entry_id):
        raise ValueError(f"bad id {entry_id[:80]!r}: use up to {MAX_ID_CHARS} letters, digits and . _ : -")
    question = clean_line(question, "question", MAX_QUESTION_CHARS)
    if isinstance(tags, str):
        tags = re.split(r"[;,|]", tags)
    if not isinstance(tags, (list, tuple)):
        raise ValueError("tags must be a list of strings")
    tags = list(dict.fromkeys(clean_line(t, "tag", MAX_TAG_CHARS).lower() for t in tags if not isinstance(t, str) or t.strip()))
    if len(tags) > MAX_TAGS:
        raise ValueError(f"{len(tags)} tags (limit {MAX_TAGS})")
    if not isinstance(alternates, (list, tuple)):
        raise ValueError("alternates must be a list of strings")
    seen = {question.casefold()}
    kept = []
    for alternate in alternates:
        alternate = clean_line(alternate, "alternate", MAX_QUESTION_CHARS)
        if alternate.casefold() not in seen:
            seen.add(alternate.casefold())
            kept.append(alternate)
    if len(kept) > MAX_ALTERNATES:
        raise ValueError(f"{len(kept)} alternates (limit {MAX_ALTERNATES})")
    return FaqEntry(entry_id, question, clean_answer(answer), tags, kept)


class Problems:
    """Collects `line N: reason` messages; raises them all at once as one InvalidInput."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.items: list[str] = []

    def add(self, line: int, reason: str) -> None:
        self.items.append(f"line {line}: {reason}")

    def raise_any(self) -> None:
        if self.items:
            shown = "; ".join(self.items[:MAX_ERRORS_SHOWN])
            more = f"; and {len(self.items) - MAX_ERRORS_SHOWN} more" if len(self.items) > MAX_ERRORS_SHOWN else ""
            raise InvalidInput(f"{self.name}: {shown}{more} (nothing was imported)")


def read_text(path: Path) -> str:
    """The file as text; refuses missing, oversized and non-UTF-8 files, naming the line."""
    try:
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            raise InvalidInput(f"{path.name}: {size} bytes is over the {MAX_FILE_BYTES // (1024 * 1024)} MB limit")
        data = path.read_bytes()
    except FileNotFoundError:
        raise InvalidInput(f"{path}: no such file") from None
    except IsADirectoryError:
        raise InvalidInput(f"{path}: is a directory, not a file") from None
    except OSError as exc:
        raise InvalidInput(f"{path}: cannot be read ({exc.strerror})") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise InvalidInput(f"{path.name}: line {line}: not UTF-8 text (byte 0x{data[exc.start]:02x}); "
                           "save the file as UTF-8") from None


def parse_csv(text: str, problems: Problems) -> list[tuple[int, FaqEntry]]:
    """Rows `id,question,answer[,tags]`; a first row naming those columns is a header."""
    out = []
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    start = 1
    try:
        for row in reader:
            line, start = start, reader.line_num + 1
            if not row or all(not cell.strip() for cell in row):
                continue
            if line == 1 and [c.strip().lower() for c in row][:3] == ["id", "question", "answer"]:
                continue
            if len(row) not in (3, 4):
                problems.add(line, f"{len(row)} columns, expected id,question,answer[,tags]")
                continue
            try:
                out.append((line, make_entry(row[0], row[1], row[2], row[3] if len(row) == 4 else ())))
            except ValueError as exc:
                problems.add(line, str(exc))
    except csv.Error as exc:
        problems.add(start, f"malformed CSV ({exc})")
    return out


def parse_jsonl(text: str, problems: Problems) -> list[tuple[int, FaqEntry]]:
    """One JSON object a line: {"id", "question", "answer", "tags"?, "alternates"?}."""
    out = []
    for line, raw in enumerate(text.split("\n"), start=1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
        except ValueError as exc:
            problems.add(line, f"not valid JSON ({exc.args[0].split(':')[0]})")
            continue
        if not isinstance(obj, dict):
            problems.add(line, "expected a JSON object")
            continue
        try:
            missing = [key for key in ("id", "question", "answer") if key not in obj]
            if missing:
                raise ValueError(f"missing {', '.join(missing)}")
            out.append((line, make_entry(obj["id"], obj["question"], obj["answer"], obj.get("tags") or (),
                                         obj.get("alternates") or ())))
        except ValueError as exc:
            problems.add(line, str(exc))
    return out


def slugify(text: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode().lower())
    return slug.strip("-")[:MAX_ID_CHARS].strip("-") or "entry"


def parse_markdown(text: str, problems: Problems) -> list[tuple[int, FaqEntry]]:
    """`## question {#id}` then the answer; a last line `Tags: a, b` tags it; no `{#id}` = a slug of the question."""
    sections: list[tuple[int, str, list[str]]] = []
    fenced = False
    for line, raw in enumerate(text.split("\n"), start=1):
        if raw.lstrip().startswith("```"):
            fenced = not fenced
        if not fenced and raw.startswith("## "):
            sections.append((line, raw[3:], []))
        elif not fenced and raw.startswith("# "):
            continue  # the document's title
        elif sections:
            sections[-1][2].append(raw)
    out = []
    for line, heading, body in sections:
        match = HEADING_ID.search(heading)
        question = heading[: match.start()] if match else heading
        lines = [b.rstrip() for b in body]
        while lines and not lines[-1].strip():
            lines.pop()
        tags: list[str] = []
        if lines and (tag_match := TAGS_LINE.match(lines[-1].strip())):
            tags = [t for t in re.split(r"[;,|]", tag_match.group(1)) if t.strip()]
            lines.pop()
        try:
            entry_id = match.group(1) if match else slugify(question)
            out.append((line, make_entry(entry_id, question, "\n".join(lines), tags)))
        except ValueError as exc:
            problems.add(line, str(exc))
    return out


PARSERS = {"csv": parse_csv, "jsonl": parse_jsonl, "markdown": parse_markdown}


def parse_faq_text(text: str, fmt: str, name: str = "FAQ") -> list[FaqEntry]:
    """Entries from text in `fmt` ("csv", "jsonl", "markdown"); InvalidInput lists every bad line."""
    if fmt not in PARSERS:
        raise InvalidInput(f"unknown FAQ format {fmt!r}: use csv, jsonl or markdown")
    problems = Problems(name)
    parsed = PARSERS[fmt](text, problems)
    first_line: dict[str, int] = {}
    for line, entry in parsed:
        if entry.id in first_line:
            problems.add(line, f"duplicate id {entry.id!r} (first on line {first_line[entry.id]})")
        else:
            first_line[entry.id] = line
    problems.raise_any()
    if not parsed:
        raise InvalidInput(f"{name}: no FAQ entries found" + (" (Markdown questions start with `## `)"
                                                                if fmt == "markdown" else ""))
    if len(parsed) > MAX_ENTRIES:
        raise InvalidInput(f"{name}: {len(parsed)} entries (limit {MAX_ENTRIES})")
    return [entry for _, entry in parsed]


def parse_faq_file(path: Path) -> list[FaqEntry]:
    """Entries from a .csv, .jsonl/.ndjson or .md/.markdown file, validated whole."""
    path = Path(path)
    fmt = SUFFIXES.get(path.suffix.lower())
    if fmt is None:
        raise InvalidInput(f"{path.name}: unknown FAQ file type {path.suffix or '(none)'!r}: "
                           "use .csv, .jsonl or .md")
    return parse_faq_text(read_text(path), fmt, path.name)
