"""A tiny WSGI app for the multi-process race test (tests/test_concurrency.py) under gunicorn.

The store comes from the environment (SESSION_STORE, DATABASE_URL/SESSION_TABLE,
REDIS_URL/SESSION_REDIS_PREFIX, SESSION_SQLITE_PATH), as in a real deployment.

    GET /login       start a session {"user": "alice"}
    GET /set?k=NAME  load the session, sleep ~50 ms, then set session[NAME] = true
    GET /dump        the session as JSON
Every response names the worker process in an ``X-Worker-Pid`` header.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING
from urllib.parse import parse_qs

from wsgisession import SessionMiddleware

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIEnvironment

WRITE_DELAY = 0.05


def race(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
    session = environ["session"]
    path = environ.get("PATH_INFO", "")
    body = b"ok"
    if path == "/login":
        session["user"] = "alice"
    elif path == "/set":
        name = parse_qs(environ.get("QUERY_STRING", ""))["k"][0]
        session.get("user")  # loaded now: the sleep is the window in which the others write
        time.sleep(WRITE_DELAY)
        session[name] = True
    elif path == "/dump":
        body = json.dumps(dict(session), sort_keys=True).encode()
    headers = [("Content-Type", "text/plain"), ("Content-Length", str(len(body))), ("X-Worker-Pid", str(os.getpid()))]
    start_response("200 OK", headers)
    return [body]


app = SessionMiddleware(race)
