"""Server-rendered pages: one Jinja2 environment over `templates/`, autoescaped, with the few filters the pages use."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from urllib.parse import quote

from fastapi import Request
from fastapi.responses import HTMLResponse
from jinja2 import Environment, FileSystemLoader, select_autoescape

from bot.http.console.access import ConsoleSession

HERE = Path(__file__).parent
PAGES = (("conversations", "Conversations"), ("handoffs", "Handoff queue"), ("users", "Users"), ("faq", "FAQ"),
         ("adapters", "Adapters"), ("experiments", "Experiments"), ("feedback", "Feedback"), ("monitoring", "Monitoring"))


def when(value: datetime | str | None) -> str:
    """A timestamp as `YYYY-MM-DD HH:MM:SS` (UTC)."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value.replace("T", " ")[:19]
    return value.strftime("%Y-%m-%d %H:%M:%S")


def sources_of(raw: str | None) -> list[dict]:
    try:
        items = json.loads(raw or "[]")
    except ValueError:
        return []
    return [s for s in items if isinstance(s, dict)] if isinstance(items, list) else []


def path_part(value: str) -> str:
    """An id as one URL path segment."""
    return quote(str(value), safe="")


environment = Environment(loader=FileSystemLoader(HERE / "templates"), autoescape=select_autoescape(["html"]),
                          trim_blocks=True, lstrip_blocks=True)
environment.filters.update(when=when, sources=sources_of, seg=path_part)
environment.globals["pages"] = PAGES


def render(request: Request, session: ConsoleSession | None, template: str, *, status: int = 200,
           **context) -> HTMLResponse:
    """A page (or a fragment, for the live parts) with the session's CSRF token at hand for its forms."""
    html = environment.get_template(template).render(request=request, csrf=session.csrf if session else "",
                                                     caller=session.caller if session else None, **context)
    response = HTMLResponse(html, status_code=status)
    response.headers["Cache-Control"] = "no-store"
    response.headers["X-Frame-Options"] = "DENY"
    response.headers["Content-Security-Policy"] = (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; frame-ancestors 'none'")
    return response
