"""Concurrent requests of one session never lose each other's changes.

Every test drives the real middleware against every store. Requests race in threads that meet
at a barrier *after* the session is loaded and *before* the response starts (when the
middleware saves), so both requests of a pair hold the same old state when they write: a
middleware that wrote the whole session back would lose one key per pair (the control test
shows the harness catches exactly that). The last test runs the race across real gunicorn
worker processes. PostgreSQL runs on each driver, Redis on each server kind (conftest's STORE_KINDS).
"""

from __future__ import annotations

import http.client
import json
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple
from urllib.parse import urlsplit

import pytest
import redis
from gunicorn_runner import gunicorn
from servers import PG_DRIVERS, REDIS_KINDS, SECRET, drop_table, require_postgres, shared_redis_url, unique
from werkzeug.test import create_environ, run_wsgi_app

from wsgisession import MemoryStore, Session, SessionCore, SessionMiddleware, SessionStore
from wsgisession.core import Visit
from wsgisession.session import encode
from wsgisession.signing import store_key

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIEnvironment

PAIRS = 200  # pairs of simultaneous writers per store
CLIENTS = 8  # threads sending them: several pairs overlap, besides the two of a pair
ROUNDS = 10  # ordered same-key rounds per store
WAIT = 10.0  # seconds any barrier or event may wait before the test fails instead of hanging
INITIAL = {"user": "alice", "cart": [1, 2, 3], "prefs": {"theme": "dark"}}

Action = Callable[[Session], None]


# -- an in-process client ------------------------------------------------------------------


class Response(NamedTuple):
    status: str
    set_cookie: str | None  # the Set-Cookie header, if any
    body: bytes

    @property
    def cookie(self) -> str | None:
        """The ``name=value`` a browser would send next, None when this response sets no live cookie."""
        if self.set_cookie is None or "Max-Age=0" in self.set_cookie:
            return None
        pair = self.set_cookie.split(";", 1)[0]
        return pair if pair.partition("=")[2] else None

    @property
    def expires_cookie(self) -> bool:
        return self.set_cookie is not None and "Max-Age=0" in self.set_cookie


def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
    """``/login`` starts a session of INITIAL; ``/act`` loads the session and runs the request's
    ``test.action`` on it; ``/dump`` returns the session as JSON. ``test.after_save`` runs once the
    response has started, i.e. once the middleware has saved."""
    session: Session = environ["session"]
    path = environ["PATH_INFO"]
    body = b"ok"
    if path == "/login":
        session.update(INITIAL)
        session.update(environ.get("test.data", {}))
    elif path == "/act":
        session.get("user")  # loaded now, before the action's barrier
        environ["test.action"](session)
    elif path == "/dump":
        body = json.dumps(dict(session)).encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    after_save = environ.get("test.after_save")
    if after_save is not None:
        after_save()
    return [body]


def request(
    mw: SessionMiddleware,
    path: str,
    cookie: str | None = None,
    action: Action | None = None,
    after_save: Callable[[], None] | None = None,
    **extra: Any,
) -> Response:
    environ = create_environ(path, headers={"Cookie": cookie} if cookie else {})
    environ.update({"test.action": action, "test.after_save": after_save, **extra})
    body, status, headers = run_wsgi_app(mw, environ, buffered=True)
    return Response(status, headers.get("Set-Cookie"), b"".join(body))


def login(mw: SessionMiddleware, **data: Any) -> str:
    response = request(mw, "/login", **{"test.data": data})
    assert response.cookie is not None, response
    return response.cookie


def dump(mw: SessionMiddleware, cookie: str | None) -> dict[str, Any]:
    """The session a browser sending ``cookie`` gets: {} when it is not logged in."""
    return dict(json.loads(request(mw, "/dump", cookie).body))


def record_key(mw: SessionMiddleware, cookie: str) -> str:
    """The store's key of the session named by ``cookie``."""
    found = mw.core.format.signer.unsign(cookie.partition("=")[2])
    assert found is not None
    return store_key(found[0])


def middleware(store: SessionStore, **options: Any) -> SessionMiddleware:
    options.setdefault("secret", SECRET)
    return SessionMiddleware(app, store, **options)


def kind(store: SessionStore) -> str:
    return type(store).__name__


def race_pairs(mw: SessionMiddleware, cookie: str, pairs: int, clients: int) -> list[Response]:
    """``pairs`` pairs of requests on one session: a<i> and b<i> each set their own key, after both loaded."""

    def writer(name: str, barrier: threading.Barrier) -> Action:
        def act(session: Session) -> None:
            barrier.wait()  # both requests of the pair have loaded the same state
            session[name] = True

        return act

    with ThreadPoolExecutor(clients) as pool:
        futures = []
        for i in range(pairs):
            barrier = threading.Barrier(2, timeout=WAIT)
            futures += [pool.submit(request, mw, "/act", cookie, writer(f"{side}{i}", barrier)) for side in "ab"]
        return [f.result() for f in futures]


def lost_updates(data: dict[str, Any], pairs: int) -> list[str]:
    return [f"{side}{i}" for i in range(pairs) for side in "ab" if data.get(f"{side}{i}") is not True]


# -- many writers at once ------------------------------------------------------------------


def test_simultaneous_writers_of_one_session_lose_no_update(store: SessionStore) -> None:
    mw = middleware(store)
    cookie = login(mw)
    responses = race_pairs(mw, cookie, PAIRS, CLIENTS)
    assert {r.status for r in responses} == {"200 OK"}
    assert {r.cookie for r in responses} == {cookie}  # every writer keeps the browser logged in
    data = dump(mw, cookie)
    lost = lost_updates(data, PAIRS)
    print(f"{kind(store)}: {len(lost)} lost updates of {2 * PAIRS} ({PAIRS} pairs)")
    assert lost == []
    assert {k: data[k] for k in INITIAL} == INITIAL  # keys nobody changed are intact
    assert len(data) == len(INITIAL) + 2 * PAIRS


class WholeSessionWrites(SessionCore):
    """A core that writes back the whole session it loaded, as most session libraries do."""

    def save(self, visit: Visit, session: Session, *, secure: bool, persistent: bool = True,
             refresh: bool = True) -> list[str]:  # fmt: skip
        if session.new or not session.modified:
            return super().save(visit, session, secure=secure)
        session.mark_saved()
        values = {k: encode(k, v) for k, v in session.items()}
        self.store.create(store_key(session.id), values, self.settings.max_age)
        return [self.cookie(session.id, session.created or 0, secure)]


def test_the_race_harness_catches_whole_session_writes() -> None:
    """Control: with two clients each pair runs alone, so whole-session writes lose exactly one key per pair."""
    mw = SessionMiddleware(app, MemoryStore(), secret=SECRET)
    mw.core = WholeSessionWrites(mw.settings, mw.store)
    cookie = login(mw)
    race_pairs(mw, cookie, PAIRS, clients=2)
    lost = lost_updates(dump(mw, cookie), PAIRS)
    assert len(lost) == PAIRS
    # ... while the real middleware on the same schedule loses none.
    mw = middleware(MemoryStore())
    cookie = login(mw)
    race_pairs(mw, cookie, PAIRS, clients=2)
    assert lost_updates(dump(mw, cookie), PAIRS) == []


def step(change: Action, barrier: threading.Barrier, after: threading.Event | None = None) -> Action:
    """An action that meets its partner at ``barrier`` (both have loaded), waits for ``after`` if given
    (the partner has saved), then makes ``change``."""

    def act(session: Session) -> None:
        barrier.wait()
        if after is not None:
            assert after.wait(WAIT)
        change(session)

    return act


def _write_shared(side: str, i: int, delete: str | None = None) -> Action:
    def change(session: Session) -> None:
        if delete is not None:
            del session[delete]
        session["shared"] = f"{side}{i}"
        session[f"{side}{i}"] = True

    return change


def test_same_key_later_writer_wins_that_key_only(store: SessionStore) -> None:
    """Both requests set ``shared`` and a key of their own, and the first deletes a key: the
    second one's value of ``shared`` wins; the first's own key and its deletion survive."""
    mw = middleware(store)
    cookie = login(mw, **{f"tmp{i}": i for i in range(ROUNDS)})
    for i in range(ROUNDS):
        first, second = ("a", "b") if i % 2 == 0 else ("b", "a")
        barrier, first_saved = threading.Barrier(2, timeout=WAIT), threading.Event()
        with ThreadPoolExecutor(2) as pool:
            done = [
                pool.submit(request, mw, "/act", cookie, step(_write_shared(first, i, delete=f"tmp{i}"), barrier),
                            after_save=first_saved.set),
                pool.submit(request, mw, "/act", cookie, step(_write_shared(second, i), barrier, first_saved)),
            ]  # fmt: skip
            assert [f.result().cookie for f in done] == [cookie, cookie]
        data = dump(mw, cookie)
        assert data["shared"] == f"{second}{i}"
        assert data[f"a{i}"] is True and data[f"b{i}"] is True
        assert f"tmp{i}" not in data
        assert [k for k in data if k.startswith("tmp")] == [f"tmp{j}" for j in range(i + 1, ROUNDS)]
        assert {k: data[k] for k in INITIAL} == INITIAL


# -- logout and login racing other requests ------------------------------------------------

NEW_SECRET = "another-test-secret-9876543210-ZYXWVUTSRQPONMLKJIH"


def _late_set(session: Session) -> None:
    session["late"] = True


def _late_delete(session: Session) -> None:
    del session["cart"]


@pytest.mark.parametrize(
    "late",
    ["set a key", "delete a key", "read only, re-signing the cookie"],
)
def test_logout_racing_a_slow_request_stays_logged_out(store: SessionStore, late: str) -> None:
    """Request 1 loads the session and stalls; request 2 logs out; request 1 then finishes."""
    mw = middleware(store)
    cookie = login(mw)
    key = record_key(mw, cookie)
    slow_mw, action = mw, {"set a key": _late_set, "delete a key": _late_delete}.get(late)
    if action is None:  # the secret was rotated: the old-signed cookie is re-signed, so the save is a touch
        slow_mw, action = middleware(store, secret=[NEW_SECRET, SECRET]), lambda session: None
    loaded, logged_out = threading.Event(), threading.Event()

    def slow(session: Session) -> None:
        loaded.set()
        assert logged_out.wait(WAIT)
        action(session)

    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(request, slow_mw, "/act", cookie, slow)
        assert loaded.wait(WAIT)
        logout = request(mw, "/act", cookie, Session.invalidate)
        logged_out.set()
        finished = pending.result()
    assert logout.expires_cookie
    assert finished.cookie is None  # the slow request does not hand the browser a live cookie
    assert store.load(key) is None  # nor does it bring the record back
    assert dump(mw, cookie) == {}  # the old cookie no longer logs anyone in
    assert dump(slow_mw, cookie) == {}


def _login_as_bob(session: Session) -> None:
    session.regenerate()
    session["user"] = "bob"


@pytest.mark.parametrize("order", ["regenerate saves first", "write saves first", "unordered"])
def test_regenerate_racing_a_write_leaves_no_old_record(store: SessionStore, order: str) -> None:
    """A login (regenerate) and another request of the same session both load it, then save in
    ``order``: afterwards the old id's record is gone and only the new cookie logs in."""
    mw = middleware(store)
    rounds = 10 if order == "unordered" else 2
    expired_by_writer = 0
    for _ in range(rounds):
        old = login(mw)
        barrier, first_saved = threading.Barrier(2, timeout=WAIT), threading.Event()
        if order == "unordered":
            regenerate, write = step(_login_as_bob, barrier), step(_late_set, barrier)
            regenerate_saved = write_saved = None
        elif order == "regenerate saves first":
            regenerate, write = step(_login_as_bob, barrier), step(_late_set, barrier, first_saved)
            regenerate_saved, write_saved = first_saved.set, None
        else:
            regenerate, write = step(_login_as_bob, barrier, first_saved), step(_late_set, barrier)
            regenerate_saved, write_saved = None, first_saved.set
        with ThreadPoolExecutor(2) as pool:
            regenerating = pool.submit(request, mw, "/act", old, regenerate, after_save=regenerate_saved)
            writing = pool.submit(request, mw, "/act", old, write, after_save=write_saved)
            login_response, write_response = regenerating.result(), writing.result()
        expired_by_writer += write_response.expires_cookie
        new = login_response.cookie
        assert new is not None and new != old
        assert store.load(record_key(mw, old)) is None  # no orphan under the old id
        assert dump(mw, old) == {}  # the old cookie logs nobody in
        assert dump(mw, new)["user"] == "bob"
        if write_response.cookie is not None:  # the write saved before the login: its cookie is the old one
            assert write_response.cookie == old
    assert expired_by_writer == 0  # the slower request never undoes the login's cookie


# -- real gunicorn workers -----------------------------------------------------------------

HTTP_REQUESTS = 200
HTTP_CLIENTS = 16


@pytest.fixture
def race_env(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[dict[str, str]]:
    """The environment of tests/race_app.py for one store mode (``postgres-<driver>``, or a Redis server kind),
    on private names; cleaned up afterwards."""
    name, _, driver = request.param.partition("-")
    mode = "redis" if name in REDIS_KINDS else name
    env = {"SESSION_STORE": mode, "SESSION_CLEANUP_INTERVAL": "0", "SESSION_STORE_TIMEOUT": "5"}
    if mode == "postgres":
        env.update(DATABASE_URL=require_postgres(), SESSION_TABLE=unique("race"), SESSION_PG_DRIVER=driver)
    elif mode == "redis":
        env.update(REDIS_URL=shared_redis_url(name), SESSION_REDIS_PREFIX=unique("race") + ":")
    else:
        env.update(SESSION_SQLITE_PATH=str(tmp_path / "race.sqlite3"))
    yield env
    if mode == "postgres":
        drop_table(env["DATABASE_URL"], env["SESSION_TABLE"])
    elif mode == "redis":
        client = redis.Redis.from_url(env["REDIS_URL"])
        for key in client.scan_iter(match=env["SESSION_REDIS_PREFIX"] + "*"):
            client.delete(key)
        client.close()


def http_get(url: str, path: str, cookie: str | None = None) -> tuple[int, str, str | None, bytes]:
    """(status, worker pid, Set-Cookie, body) of one request on a fresh connection."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    try:
        conn.request("GET", path, headers={"Connection": "close", **({"Cookie": cookie} if cookie else {})})
        response = conn.getresponse()
        pid, set_cookie = response.getheader("X-Worker-Pid", ""), response.getheader("Set-Cookie")
        return response.status, pid, set_cookie, response.read()
    finally:
        conn.close()


@pytest.mark.slow
@pytest.mark.parametrize(
    "race_env", [*(f"postgres-{driver}" for driver in PG_DRIVERS), *REDIS_KINDS, "sqlite"], indirect=True
)
def test_gunicorn_workers_lose_no_concurrent_update(race_env: dict[str, str]) -> None:
    """200 requests, 16 at a time, each load the session, sleep 50 ms and set their own key,
    served by 2 worker processes of 4 threads (at most 4 connections each, so both serve)."""
    options = ("--pythonpath", "tests", "--worker-connections", "4", "--keep-alive", "0")
    with gunicorn("race_app:app", race_env, workers=2, threads=4, args=options) as (url, _):
        status, _, set_cookie, _ = http_get(url, "/login")
        assert status == 200 and set_cookie is not None
        cookie = set_cookie.split(";", 1)[0]
        with ThreadPoolExecutor(HTTP_CLIENTS) as pool:
            results = list(pool.map(lambda i: http_get(url, f"/set?k=k{i}", cookie), range(HTTP_REQUESTS)))
        status, _, _, body = http_get(url, "/dump", cookie)
    assert status == 200
    data = json.loads(body)
    lost = [f"k{i}" for i in range(HTTP_REQUESTS) if data.get(f"k{i}") is not True]
    workers = Counter(pid for _, pid, _, _ in results)
    print(f"gunicorn {race_env['SESSION_STORE']}: {len(lost)} lost updates of {HTTP_REQUESTS}; "
          f"requests per worker {sorted(workers.values())}")  # fmt: skip
    assert [r[0] for r in results] == [200] * HTTP_REQUESTS
    assert len(workers) == 2  # the race really spanned processes
    assert lost == []
    assert data["user"] == "alice"
