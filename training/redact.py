"""Personal data out of training text: emails, phone numbers and card-like numbers become placeholders."""

from __future__ import annotations

import re

EMAIL = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}")
# 13-19 digits, optionally grouped by spaces or dashes: every card number, and every IBAN-ish digit run.
CARD = re.compile(r"(?<![\w])\d(?:[ -]?\d){12,18}(?![\w])")
# A digit run of 7-15 digits with the separators phone numbers use; dates and times are spared below.
PHONE = re.compile(r"(?<![\w+(])(?:\+|\()?\d[\d ()./-]{5,}\d(?![\w])")
DATE_OR_TIME = re.compile(r"^\d{1,4}[./-]\d{1,2}[./-]\d{1,4}$|^\d{1,2}[:.]\d{2}$")

PLACEHOLDERS = {"email": "[email]", "phone": "[phone]", "card": "[card]"}


def _phone(match: re.Match) -> str:
    text = match.group(0)
    digits = sum(c.isdigit() for c in text)
    if not 7 <= digits <= 15 or DATE_OR_TIME.match(text.strip()):
        return text
    return PLACEHOLDERS["phone"]


def redact(text: str) -> str:
    """`text` with personal identifiers replaced; cards go first so their digits never read as a phone."""
    text = EMAIL.sub(PLACEHOLDERS["email"], text)
    text = CARD.sub(PLACEHOLDERS["card"], text)
    return PHONE.sub(_phone, text)


def redact_messages(messages: list[dict[str, str]]) -> list[dict[str, str]]:
    return [{**m, "content": redact(m["content"])} for m in messages]
