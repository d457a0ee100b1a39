"""Model text to Telegram messages: Markdown-ish text as safe Telegram HTML, and splits at the 4096 limit.

Telegram counts a message's length in UTF-16 code units of its visible text. Every converter here emits
balanced tags from any input (half-written Markdown while streaming included), and its visible text is
never longer than the raw text, so a raw piece within the limit always fits.
"""

from __future__ import annotations

import html
import re

MESSAGE_LIMIT = 4096
FENCE_MARGIN = 8  # room to close a code fence ("\n```") at a split and reopen it in the next piece

FENCE = re.compile(r"```([A-Za-z0-9_+-]*)[^\S\n]*\n?(.*?)(?:```|\Z)", re.S)
INLINE = re.compile(
    r"`([^`\n]+)`"  # inline code
    r"|\*\*(?=\S)(.+?)(?<=\S)\*\*"  # bold
    r"|\[([^\]\n]+)\]\((https?://[^\s()<>\"]+)\)"  # a link to the web, nothing else
)
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*$", re.M)
BULLET = re.compile(r"^(\s*)[-*+]\s+", re.M)
# Lone surrogates are valid in JSON but not in UTF-8; they would break the store and the Bot API alike.
SURROGATES = re.compile(r"[\ud800-\udfff]")


def utf16_len(text: str) -> int:
    """Length as Telegram counts it: UTF-16 code units (an emoji outside the BMP is two)."""
    return len(text) + sum(1 for ch in text if ord(ch) > 0xFFFF)


def scrub(text: str) -> str:
    """Incoming text made safe to store and echo: lone surrogates become U+FFFD."""
    return SURROGATES.sub("\ufffd", text)


def escape(text: str) -> str:
    return html.escape(text, quote=False)


def to_html(text: str) -> str:
    """Telegram HTML for model text: fenced and inline code, **bold**, headings, bullets, web links; all else escaped."""
    out: list[str] = []
    pos = 0
    for match in FENCE.finditer(text):
        out.append(_inline_html(text[pos:match.start()]))
        language, code = match.group(1), match.group(2).rstrip("\n")
        if code.strip():
            attr = f' class="language-{language}"' if language else ""
            out.append(f"<pre><code{attr}>{escape(code)}</code></pre>")
        pos = match.end()
    out.append(_inline_html(text[pos:]))
    return "".join(out)


def _inline_html(text: str) -> str:
    text = HEADING.sub(lambda m: f"**{m.group(1)}**" if "**" not in m.group(1) else m.group(1), text)
    text = BULLET.sub(lambda m: f"{m.group(1)}• ", text)
    out: list[str] = []
    pos = 0
    for match in INLINE.finditer(text):
        out.append(escape(text[pos:match.start()]))
        code, bold, label, url = match.groups()
        if code is not None:
            out.append(f"<code>{escape(code)}</code>")
        elif bold is not None:
            out.append(f"<b>{escape(bold)}</b>")
        else:
            out.append(f'<a href="{html.escape(url, quote=True)}">{escape(label)}</a>')
        pos = match.end()
    out.append(escape(text[pos:]))
    return "".join(out)


def split_message(text: str, limit: int = MESSAGE_LIMIT) -> list[str]:
    """`text` in pieces of at most `limit` UTF-16 units, cut at a paragraph, line, sentence or word when it can;
    a code block cut in two is closed at the end of one piece and reopened at the start of the next."""
    pieces: list[str] = []
    budget = limit - FENCE_MARGIN
    while utf16_len(text) > limit:
        cut = _best_cut(text, budget)
        head, rest = text[:cut].rstrip(), text[cut:]
        if head.count("```") % 2:  # inside a code block: close it here, reopen it in the next piece
            head += "\n```"
            rest = "```\n" + rest.lstrip("\n")
        else:
            rest = rest.lstrip()
        if head.strip():
            pieces.append(head)
        text = rest
    if text.strip() or not pieces:
        pieces.append(text)
    return pieces


def _best_cut(text: str, budget: int) -> int:
    """The index to cut `text` at: the last clean boundary within `budget` UTF-16 units."""
    units, end = 0, 0
    for end, ch in enumerate(text):
        units += 2 if ord(ch) > 0xFFFF else 1
        if units > budget:
            break
    window = text[:end]
    floor = len(window) // 2  # never cut so early that pieces come out tiny
    for boundary in ("\n\n", "\n"):
        at = window.rfind(boundary)
        if at > floor:
            return at + len(boundary)
    sentence = max(window.rfind(mark) for mark in (". ", "! ", "? ", "; "))
    if sentence > floor:
        return sentence + 2
    space = window.rfind(" ")
    if space > floor:
        return space + 1
    return max(end, 1)
