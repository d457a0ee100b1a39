"""Text and ids as every room takes them in: one cleaner (control characters, lone surrogates) and one id validator.

They live in the bottom room so that memory, dialogue, training and the channels all use the same rules.
"""

from __future__ import annotations

import re

from memory.errors import InvalidInput

ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:@+-]{0,127}$")
# C0/C1 controls and DEL, except tab and newline; escape sequences lose their ESC and cannot act.
CONTROL_CHARS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
# Lone UTF-16 surrogates (JSON's "\ud800" decodes to one): no encoder or database takes them.
SURROGATES = re.compile(r"[\ud800-\udfff]")
LINE_BREAKS = re.compile(r"[\t\n\r]")


def strip_controls(text: str) -> str:
    """`text` with Windows line ends made plain, every other control character and lone surrogates removed."""
    return SURROGATES.sub("", CONTROL_CHARS.sub("", text.replace("\r\n", "\n")))


def one_line(text: str) -> str:
    """`text` cleaned as by `strip_controls`, tabs and line breaks made spaces (a field, a label)."""
    return strip_controls(LINE_BREAKS.sub(" ", text))


def clean_text(value: object, what: str = "text", *, max_chars: int | None = None) -> str:
    """Control characters removed and ends stripped; not a string, empty after that, or too long is an error."""
    if not isinstance(value, str):
        raise InvalidInput(f"{what} must be a string")
    text = strip_controls(value).strip()
    if not text:
        raise InvalidInput(f"{what} is empty")
    if max_chars is not None and len(text) > max_chars:
        raise InvalidInput(f"{what} is {len(text)} characters; the limit is {max_chars}")
    return text


def validate_id(value: object, what: str) -> str:
    """A user, conversation or similar id: 1-128 of letters, digits and _.:@+-, starting with a letter or digit."""
    if not isinstance(value, str) or not ID_PATTERN.match(value):
        raise InvalidInput(f"{what} must be 1-128 characters of letters, digits and _.:@+- (got {str(value)[:40]!r})")
    return value
