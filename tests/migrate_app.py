"""A tiny WSGI app for the store-moving tests (tests/test_migrate_deploy.py) under gunicorn.

The store comes from the environment (SESSION_STORE, DATABASE_URL/SESSION_TABLE, REDIS_URL/
SESSION_REDIS_PREFIX, SESSION_SQLITE_PATH, SESSION_MIGRATE_FROM), as in a real deployment.

    GET /login?user=NAME  log NAME in (a session bound to the user) with count 0
    GET /inc              count + 1, when logged in
    GET /peek             the session as it is
    GET /status           the store's status as this worker sees it (how many sessions it moved)
Every reply but /status is JSON: {"user": the logged-in user or null, "count": ..., "key": the store key or null}.
Every response names the worker process in an ``X-Worker-Pid`` header.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

from wsgisession import Session, SessionMiddleware
from wsgisession.status import status_app

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIEnvironment


def counter(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
    def answer(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Callable[[bytes], object]:
        return start_response(status, [*headers, ("X-Worker-Pid", str(os.getpid()))], exc_info)

    path = environ.get("PATH_INFO", "")
    if path == "/status":
        return status_app(app.store)(environ, answer)
    session: Session = environ["session"]
    if path == "/login":
        session.login(parse_qs(environ.get("QUERY_STRING", ""))["user"][0])
        session["count"] = 0
    elif path == "/inc" and session.user_id is not None:
        session["count"] += 1
    user = session.user_id
    key = app.core.format.store_key(session.id) if user is not None else None
    body = json.dumps({"user": user, "count": session.get("count"), "key": key}).encode()
    answer("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
    return [body]


app = SessionMiddleware(counter)
