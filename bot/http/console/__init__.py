"""The operators' web console at `/admin`: server-rendered pages (Jinja2) with one small script, no build step.

`install_console(app)` adds it to the API app: the login form and session (`access`), conversations and the
handoff queue (`conversations`), users and the FAQ (`people`), adapters, experiments and feedback (`adapters`),
monitoring and scheduled retraining (`monitoring`).
Every page needs an admin key's session; every form POST its CSRF token.
"""

from __future__ import annotations

import secrets

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles

from bot.http.console import adapters, conversations, monitoring, people
from bot.http.console.access import (
    COOKIE,
    LOGIN_COOKIE,
    CsrfRefused,
    LoginRequired,
    PageMissing,
    Sessions,
    admin_caller,
    checked_form,
    current_session,
    form_of,
    sessions_of,
    set_cookie,
)
from bot.http.console.render import HERE, render

router = APIRouter()


@router.get("")
@router.get("/")
async def index(request: Request) -> RedirectResponse:
    return RedirectResponse("/admin/conversations", status_code=303)


@router.get("/login")
async def login_form(request: Request, problem: str | None = None, status: int = 200) -> Response:
    """The login form, with a CSRF token double-submitted in a cookie of its own."""
    token = secrets.token_urlsafe(24)
    response = render(request, None, "login.html", status=status, login_csrf=token, problem=problem,
                      open_mode=not request.app.state.keys.any())
    set_cookie(request, response, LOGIN_COOKIE, token, max_age=3600)
    return response


@router.post("/login")
async def login(request: Request) -> Response:
    """An admin key opens a session; any other key, or none, is refused (the attempt counts against a rate)."""
    request.app.state.limiter.check("console-login-" + (request.client.host if request.client else "unknown"))
    form = await form_of(request)
    expected = request.cookies.get(LOGIN_COOKIE, "")
    if not expected or not secrets.compare_digest(form.get("csrf", ""), expected):
        return await login_form(request, problem="The form expired: please log in again.", status=403)
    key = form.get("key", "").strip()
    caller = admin_caller(request, key)
    if caller is None:
        return await login_form(request, problem="That is not an admin key.", status=403)
    cookie, _ = sessions_of(request).open(key, caller)
    response = RedirectResponse("/admin/conversations", status_code=303)
    set_cookie(request, response, COOKIE, cookie)
    response.delete_cookie(LOGIN_COOKIE, path="/admin")
    return response


@router.post("/logout")
async def logout(request: Request) -> Response:
    session = current_session(request)
    await checked_form(request, session)
    sessions_of(request).close(session.id)
    response = RedirectResponse("/admin/login", status_code=303)
    response.delete_cookie(COOKIE, path="/admin")
    return response


async def on_login_required(request: Request, exc: LoginRequired) -> Response:
    if request.method == "GET" and "/live/" not in request.url.path and not request.url.path.endswith("/turns"):
        return RedirectResponse("/admin/login", status_code=303)
    return JSONResponse({"error": "log in to the console first"}, status_code=401)


async def on_csrf_refused(request: Request, exc: CsrfRefused) -> Response:
    return JSONResponse({"error": "missing or wrong CSRF token: reload the page and try again"}, status_code=403)


async def on_page_missing(request: Request, exc: PageMissing) -> Response:
    return render(request, None, "missing.html", status=404, problem=str(exc))


def install_console(app: FastAPI) -> None:
    """Serve the console under /admin (kept out of the OpenAPI schema: it is pages, not an API)."""
    app.state.console_sessions = Sessions()
    app.add_exception_handler(LoginRequired, on_login_required)
    app.add_exception_handler(CsrfRefused, on_csrf_refused)
    app.add_exception_handler(PageMissing, on_page_missing)
    app.mount("/admin/static", StaticFiles(directory=HERE / "static"), name="console-static")
    for part in (router, conversations.router, people.router, adapters.router, monitoring.router):
        app.include_router(part, prefix="/admin", include_in_schema=False)
