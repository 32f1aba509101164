"""A tiny WSGI app for the races of a user's sessions under gunicorn (tests/test_users_gunicorn.py).

The store comes from the environment (DATABASE_URL/SESSION_TABLE, REDIS_URL/SESSION_REDIS_PREFIX...),
as in a real deployment. Routes (answers are JSON):

    POST /login?user=U          session.login(U); with &pause=S and Redis in front of PostgreSQL, the login's
                                second write (to either store) waits S seconds after its first (a window for others)
    GET  /whoami                {"user": the session's user or null, "keys": its other keys}
    GET  /list?user=U           U's sessions: [{"handle": .., "current": ..}, ...]
    POST /end?user=U&handle=H   end one of U's sessions: {"ended": 0 or 1, "done": time}
    POST /end-all?user=U        end all of U's sessions (but this request's with &keep=1): {"ended": n, "done": time}
    POST /slow?delay=S[&k=K]    load the session, sleep S seconds, then set session[K] = true (without k: a read)
                                {"loaded": time, "saving": time}; the save follows, in start_response
Every response names the worker process in an ``X-Worker-Pid`` header.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

from wsgisession import SessionMiddleware
from wsgisession.stores.base import USER_KEY
from wsgisession.stores.failover import FailoverStore

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIEnvironment


def users(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
    session = environ["session"]
    query = {name: values[0] for name, values in parse_qs(environ.get("QUERY_STRING", "")).items()}
    route = environ["REQUEST_METHOD"], environ.get("PATH_INFO", "")
    _pause.seconds, _pause.writes = float(query.get("pause", 0)), 0
    answer: Any = None
    if route == ("POST", "/login"):
        session.login(query["user"])
    elif route == ("GET", "/whoami"):
        answer = {"user": session.user_id, "keys": sorted(key for key in session if key != USER_KEY)}
    elif route == ("GET", "/list"):
        answer = [{"handle": d.handle, "current": d.current} for d in app.users.list(query["user"], current=session)]
    elif route == ("POST", "/end"):
        answer = {"ended": int(app.users.end(query["user"], query["handle"])), "done": time.time()}
    elif route == ("POST", "/end-all"):
        ended = app.users.end_all(query["user"], keep=session if query.get("keep") else None)
        answer = {"ended": ended, "done": time.time()}
    elif route == ("POST", "/slow"):
        session.get("anything")  # loaded now: the sleep is the window in which the session is ended
        loaded = time.time()
        time.sleep(float(query["delay"]))
        if "k" in query:
            session[query["k"]] = True
        answer = {"loaded": loaded, "saving": time.time()}
    body = json.dumps(answer).encode()
    start_response("200 OK", [("Content-Type", "application/json"), ("X-Worker-Pid", str(os.getpid()))])
    return [body]


_pause = threading.local()  # how long this thread's request pauses between a new session's two writes


def _pausing(
    create: Callable[[str, Mapping[str, str], float], None],
) -> Callable[[str, Mapping[str, str], float], None]:
    """A store's create that, as the second of the request's two, waits the pause the request asked for."""

    def create_after_pause(key: str, data: Mapping[str, str], ttl: float) -> None:
        _pause.writes = getattr(_pause, "writes", 0) + 1
        if _pause.writes == 2:
            time.sleep(getattr(_pause, "seconds", 0))
        create(key, data, ttl)

    return create_after_pause


app = SessionMiddleware(users)
if isinstance(app.store, FailoverStore):
    app.store.cache.create = _pausing(app.store.cache.create)  # type: ignore[method-assign]
    app.store.durable.create = _pausing(app.store.durable.create)  # type: ignore[method-assign]
