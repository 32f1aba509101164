"""A tiny WSGI app for a key rotation under gunicorn (tests/test_encryption.py).

The store comes from the environment (REDIS_URL, SESSION_REDIS_PREFIX...), as in a deployment; the
key list, SESSION_ENCRYPTION_KEY, from the file ENCRYPTION_KEY_FILE names, read as each worker starts:
a graceful restart (SIGHUP) after the file changed gives workers of the new list. Routes (JSON):

    POST /login?user=U   session.login(U): {"user": U, "n": 0}
    POST /inc            session["n"] += 1: {"user": the session's user or null, "n": the new count}

Every response names the worker process in ``X-Worker-Pid`` and its key list in ``X-Keys`` (how many).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import parse_qs

from wsgisession import SessionMiddleware

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIEnvironment

KEYS = Path(os.environ["ENCRYPTION_KEY_FILE"]).read_text().strip()
os.environ["SESSION_ENCRYPTION_KEY"] = KEYS


def counter(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
    session = environ["session"]
    route = environ["REQUEST_METHOD"], environ.get("PATH_INFO", "")
    if route == ("POST", "/login"):
        session.login(parse_qs(environ.get("QUERY_STRING", ""))["user"][0])
        session["n"] = 0
    elif route == ("POST", "/inc"):
        session["n"] = session.get("n", 0) + 1
    body = json.dumps({"user": session.user_id, "n": session.get("n")}).encode()
    headers = [("Content-Type", "application/json"), ("X-Worker-Pid", str(os.getpid())),
               ("X-Keys", str(KEYS.count(",") + 1))]  # fmt: skip
    start_response("200 OK", headers)
    return [body]


app = SessionMiddleware(counter)
