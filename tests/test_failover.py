"""FailoverStore in one process: Redis serves, PostgreSQL keeps a durable copy, and either may go away.

Every test uses a private redis-server (killed, paused, flushed at will) and either a private
table on the shared PostgreSQL or, where PostgreSQL itself goes down, a private cluster
(pg_server.py). Where the point is what a user sees, requests go through SessionMiddleware
and a small demo app (the routes of examples/raw_wsgi.py).

Every test runs twice: on Redis with psycopg2, and on Valkey with psycopg 3 (servers.PAIRS).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any, NamedTuple
from urllib.parse import parse_qs

import prometheus_client
import pytest
import redis
from pg_server import PostgresServer
from proxy import Proxy
from servers import SECRET, RedisServer, drop_table, each_pair, require_postgres, running, unique
from werkzeug.test import create_environ, run_wsgi_app

from wsgisession import Session, SessionMiddleware
from wsgisession.signing import Signer, store_key
from wsgisession.status import status_app
from wsgisession.stores.base import Changes, Record, StoreError
from wsgisession.stores.failover import FailoverStore
from wsgisession.stores.health import MAX_HOLD
from wsgisession.stores.postgres import PostgresStore
from wsgisession.stores.redis import RedisStore

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIEnvironment

pytestmark = each_pair

PROBE = 0.2  # probe interval, s
TIMEOUT = 0.3  # Redis socket timeouts, s
WAIT = 10.0  # the longest any wait for a switch may take before the test fails

DOWN_LINE = "Redis unavailable, falling back to PostgreSQL"
BACK_LINE = "Redis is back, using Redis for session storage"
PG_DOWN_LINE = "PostgreSQL unavailable, keeping sessions in Redis until it is back"
PG_BACK_LINE = "PostgreSQL is back: "
BOTH_LINE = "Redis and PostgreSQL are both unavailable"
CHANGED_LINE = "Redis changed servers"
SLOW_LINE = "Redis too slow"


# -- the demo app and an in-process browser --------------------------------------------------


def demo(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
    """The routes of examples/raw_wsgi.py, plus ``POST /set`` (form k, v) to set one key."""
    session: Session = environ["session"]
    route = environ["REQUEST_METHOD"], environ["PATH_INFO"]
    form = {k: v[0] for k, v in parse_qs(environ["wsgi.input"].read().decode()).items()}
    if route == ("GET", "/api/session"):
        body = json.dumps({"user": session.get("user"), "count": session.get("count", 0), **dict(session)}).encode()
        start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
        return [body]
    if route == ("POST", "/login"):
        session.regenerate()
        session["user"] = form["username"]
    elif route == ("POST", "/counter"):
        session["count"] = session.get("count", 0) + 1
    elif route == ("POST", "/set"):
        session[form["k"]] = form["v"]
    elif route == ("POST", "/logout"):
        session.invalidate()
    else:
        start_response("404 Not Found", [("Content-Length", "0")])
        return [b""]
    start_response("303 See Other", [("Location", "/"), ("Content-Length", "0")])
    return [b""]


class Response(NamedTuple):
    status: int
    body: bytes
    set_cookie: str | None


class Browser:
    """One user: a cookie jar of one cookie, requests straight into the WSGI app."""

    def __init__(self, app: SessionMiddleware, cookie: str | None = None) -> None:
        self.app = app
        self.cookie = cookie

    def request(self, method: str, path: str, form: dict[str, str] | None = None) -> Response:
        body = "&".join(f"{k}={v}" for k, v in (form or {}).items())
        headers = {"Cookie": self.cookie} if self.cookie else {}
        environ = create_environ(path, method=method, data=body, headers=headers,
                                 content_type="application/x-www-form-urlencoded")  # fmt: skip
        app_iter, status, response_headers = run_wsgi_app(self.app, environ, buffered=True)
        data = b"".join(app_iter)
        set_cookie = response_headers.get("Set-Cookie")
        if set_cookie is not None:
            pair = set_cookie.split(";", 1)[0]
            self.cookie = None if "Max-Age=0" in set_cookie or pair.endswith("=") else pair
        code = int(status.split()[0])
        assert code < 500, (method, path, status, data)
        return Response(code, data, set_cookie)

    def session(self) -> dict[str, Any]:
        response = self.request("GET", "/api/session")
        assert response.status == 200
        return dict(json.loads(response.body))

    def login(self, name: str) -> None:
        assert self.request("POST", "/login", {"username": name}).status == 303
        assert self.cookie is not None

    def counter(self) -> Response:
        return self.request("POST", "/counter")

    @property
    def key(self) -> str:
        """The store key of this browser's session."""
        assert self.cookie is not None
        found = Signer([SECRET]).unsign(self.cookie.partition("=")[2])
        assert found is not None
        return store_key(found[0])


# -- the two backends -----------------------------------------------------------------------


class Backends:
    """A private Redis and a private table in a PostgreSQL, reached with ``driver``; builds FailoverStores
    ("processes") on them."""

    def __init__(self, redis_server: RedisServer, database_url: str, driver: str) -> None:
        self.redis = redis_server
        self.database_url = database_url
        self.driver = driver
        self.table = unique("failover")
        self.prefix = unique("fo") + ":"
        self.stores: list[FailoverStore] = []

    def store(self, redis_url: str | None = None, **options: Any) -> FailoverStore:
        """A process's store, reaching Redis at ``redis_url`` (through a proxy) or directly."""
        cache = RedisStore(redis_url or self.redis.url, prefix=self.prefix, timeout=TIMEOUT)
        durable = PostgresStore(
            self.database_url, table=self.table, cleanup_interval=0, timeout=1.0, driver=self.driver
        )
        store = FailoverStore(cache, durable, **{"probe_interval": PROBE, **options})
        self.stores.append(store)
        return store

    def app(self, store: FailoverStore | None = None) -> SessionMiddleware:
        return SessionMiddleware(demo, store or self.store(), secret=SECRET)

    def flushall(self) -> None:
        """FLUSHALL on the private Redis (never on the shared one)."""
        client = redis.Redis.from_url(self.redis.url)
        client.flushall()
        client.close()

    def close(self) -> None:
        for store in self.stores:
            store.close()


@pytest.fixture
def shared(private_redis: RedisServer, pg_driver: str) -> Iterator[Backends]:
    """The private Redis, and a private table on the shared PostgreSQL."""
    backends = Backends(private_redis, require_postgres(), pg_driver)
    yield backends
    backends.close()
    drop_table(backends.database_url, backends.table)


@pytest.fixture
def private_pg() -> Iterator[PostgresServer]:
    with running(PostgresServer()) as server:
        yield server


@pytest.fixture
def private(private_redis: RedisServer, private_pg: PostgresServer, pg_driver: str) -> Iterator[Backends]:
    """The private Redis, and a private PostgreSQL cluster that the test may stop and start."""
    backends = Backends(private_redis, private_pg.url, pg_driver)
    yield backends
    backends.close()


class Log:
    """The wsgisession log lines of the test so far."""

    def __init__(self, caplog: pytest.LogCaptureFixture) -> None:
        self.caplog = caplog

    def lines(self, start: str) -> list[str]:
        return [m for r in self.caplog.records if r.name == "wsgisession" and (m := r.getMessage()).startswith(start)]

    def __call__(self, start: str) -> int:
        """How many lines start with ``start``."""
        return len(self.lines(start))


@pytest.fixture
def log(caplog: pytest.LogCaptureFixture) -> Log:
    caplog.set_level(logging.INFO, logger="wsgisession")
    return Log(caplog)


def wait_until(condition: Callable[[], bool], what: str, timeout: float = WAIT) -> float:
    """Poll ``condition`` until true; return the seconds it took, or fail the test."""
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout:
            pytest.fail(f"{what}: not within {timeout} s")
        time.sleep(0.02)
    return time.monotonic() - started


# -- Redis misses and refills ---------------------------------------------------------------


def test_every_write_reaches_both_stores(shared: Backends) -> None:
    store = shared.store()
    alice = Browser(shared.app(store))
    alice.login("alice")
    alice.counter()
    alice.counter()
    key = alice.key
    for backend in (store.cache, store.durable):
        record = backend.load(key)
        assert record is not None, backend.name
        assert record.data == {"user": "alice", "count": 2}, backend.name
    assert alice.request("POST", "/logout").status == 303
    assert store.cache.load(key) is None
    assert store.durable.load(key) is None


def test_flushed_redis_is_answered_from_postgres_and_refilled(shared: Backends, log: Log) -> None:
    store = shared.store()
    alice = Browser(shared.app(store))
    alice.login("alice")
    alice.counter()
    expires = store.durable.load(alice.key).expires  # type: ignore[union-attr]
    shared.flushall()
    assert store.cache.load(alice.key) is None

    assert alice.session()["user"] == "alice"  # from PostgreSQL
    assert alice.session()["count"] == 1
    refilled = store.cache.load(alice.key)
    assert refilled is not None, "Redis was not refilled"
    assert refilled.data == {"user": "alice", "count": 1}
    assert abs(refilled.expires - expires) < 5, "the refilled copy does not keep the session's expiry"
    alice.counter()
    assert store.cache.load(alice.key).data["count"] == 2  # type: ignore[union-attr]
    assert store.durable.load(alice.key).data["count"] == 2  # type: ignore[union-attr]
    assert log(DOWN_LINE) == 0, "a miss is not an outage"
    assert store.serving_from == "Redis"


def test_logout_racing_a_refill_does_not_bring_the_session_back(shared: Backends) -> None:
    """Step by step: a request misses in Redis and reads PostgreSQL; a logout deletes the session;
    only then does the first request copy what it read into Redis."""
    store = shared.store()
    alice = Browser(shared.app(store))
    alice.login("alice")
    stolen = alice.cookie
    shared.flushall()
    read_before_logout = store.durable.load(alice.key)
    assert read_before_logout is not None
    key = alice.key
    assert alice.request("POST", "/logout").status == 303
    store._refill(key, read_before_logout)  # the slow request finishes its refill now

    assert store.cache.load(key) is None, "the logged-out session was copied back into Redis"
    assert Browser(alice.app, stolen).session()["user"] is None


def test_logout_racing_refills_in_threads_never_resurrects(shared: Backends) -> None:
    """The same race left to the scheduler: readers that refill, and a logout, start together."""
    store = shared.store()
    app = shared.app(store)
    resurrected = rounds = 0
    deadline = time.monotonic() + 3
    while rounds < 40 and time.monotonic() < deadline:
        rounds += 1
        alice = Browser(app)
        alice.login(f"alice{rounds}")
        stolen, key = alice.cookie, alice.key
        shared.flushall()
        barrier = threading.Barrier(4, timeout=WAIT)

        def read(cookie: str | None = stolen, barrier: threading.Barrier = barrier) -> None:
            barrier.wait()
            Browser(app, cookie).session()

        def logout(alice: Browser = alice, barrier: threading.Barrier = barrier) -> None:
            barrier.wait()
            alice.request("POST", "/logout")

        threads = [threading.Thread(target=read) for _ in range(3)] + [threading.Thread(target=logout)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(WAIT)
        if store.cache.load(key) is not None or Browser(app, stolen).session()["user"] is not None:
            resurrected += 1
    assert resurrected == 0, f"{resurrected} of {rounds} logged-out sessions came back"


def test_refill_racing_an_update_does_not_serve_the_older_copy(shared: Backends) -> None:
    """Step by step: a request misses in Redis and reads PostgreSQL; another request changes the
    session; only then does the first request copy what it read into Redis."""
    store = shared.store()
    alice = Browser(shared.app(store))
    alice.login("alice")
    shared.flushall()
    read_before_update = store.durable.load(alice.key)
    assert read_before_update is not None
    alice.counter()  # acknowledged: count 1, in PostgreSQL (and in Redis, refilled by this request)
    store._refill(alice.key, read_before_update)  # the slow request finishes its refill now

    assert store.durable.load(alice.key).data["count"] == 1  # type: ignore[union-attr]
    assert alice.session()["count"] == 1, "an acknowledged change was hidden by an older copy refilled into Redis"


def test_refill_does_not_undo_a_concurrent_per_key_update(shared: Backends) -> None:
    """The store contract (update merges per key) holds across a refill: keys set by one request
    while another refills are kept."""
    store = shared.store()
    alice = Browser(shared.app(store))
    alice.login("alice")
    shared.flushall()
    read_before_update = store.durable.load(alice.key)
    assert read_before_update is not None
    assert store.update(alice.key, Changes({"theme": '"dark"'}), 3600)
    store._refill(alice.key, read_before_update)
    assert alice.session().get("theme") == "dark"


# -- Redis outages ----------------------------------------------------------------------------


def test_killed_redis_is_answered_from_postgres_and_used_again_when_back(shared: Backends, log: Log) -> None:
    store = shared.store()
    alice = Browser(shared.app(store))
    alice.login("alice")
    alice.counter()
    time.sleep(2 * PROBE)  # the probe has seen which server Redis is
    shared.redis.kill()

    for expected in range(2, 7):  # served from PostgreSQL, every one of them
        assert alice.session() == {"user": "alice", "count": expected - 1}
        assert alice.counter().status == 303
    assert alice.session()["count"] == 6
    assert store.serving_from == "PostgreSQL"
    assert log(DOWN_LINE) == 1

    restarted = time.monotonic()
    shared.redis.start()  # same port, empty
    count = 6
    while store.serving_from != "Redis" and time.monotonic() - restarted < WAIT:
        assert alice.session()["count"] == count  # requests go on working on the way back
        alice.counter()
        count += 1
        time.sleep(0.02)
    back_after = time.monotonic() - restarted
    assert store.serving_from == "Redis", f"still serving from PostgreSQL {WAIT} s after Redis returned"
    # Reads wait two probe intervals without a copy to drop: other processes may still write around Redis.
    assert back_after >= 2 * PROBE, f"reads went back to Redis {back_after:.2f} s after it returned"
    # Another server (a restart): whatever it holds may be older than PostgreSQL, so every copy
    # was marked, and dropped, before it was read.
    assert log(CHANGED_LINE) == 1
    assert store.durable.count_stale() == 0
    assert alice.session() == {"user": "alice", "count": count}
    assert store.cache.load(alice.key).data == {"user": "alice", "count": count}  # type: ignore[union-attr]
    time.sleep(3 * PROBE)
    assert log(BACK_LINE) == 1
    assert log(DOWN_LINE) == 1


def test_hung_redis_costs_one_timeout_per_request_in_flight(shared: Backends, log: Log) -> None:
    """Four users keep clicking while Redis hangs (SIGSTOP): the requests in flight when it hangs
    wait for the timeout, and no later one does (counted as the failed Redis calls of requests,
    not timed: the machine may be slow for other reasons)."""
    store = shared.store()
    app = shared.app(store)
    users = [Browser(app) for _ in range(4)]
    for number, user in enumerate(users):
        user.login(f"user{number}")
    failed: list[str] = []  # the requests' Redis calls that failed (each after a timeout)
    cache = store.cache

    def counting(name: str, call: Callable[..., Any]) -> Callable[..., Any]:
        def counted(*args: Any) -> Any:
            try:
                return call(*args)
            except StoreError:
                failed.append(name)
                raise

        return counted

    for name in ("load", "create", "update", "touch", "delete"):
        setattr(cache, name, counting(name, getattr(cache, name)))
    counts = [0] * len(users)
    wrong: list[str] = []
    stop = threading.Event()

    def click(number: int) -> None:
        user, done = users[number], 0
        while not stop.is_set() and done < 2000:
            done += 1
            for method, path in (("GET", "/api/session"), ("POST", "/counter")):
                try:
                    response = user.request(method, path)
                except AssertionError as exc:  # a 5xx
                    wrong.append(str(exc))
                    continue
                if method == "GET" and json.loads(response.body) != {"user": f"user{number}", "count": counts[number]}:
                    wrong.append(response.body.decode())
            counts[number] += 1

    threads = [threading.Thread(target=click, args=(n,)) for n in range(len(users))]
    for thread in threads:
        thread.start()
    try:
        time.sleep(0.4)
        shared.redis.pause()
        time.sleep(2.5)
    finally:
        shared.redis.resume()
    stop.set()
    for thread in threads:
        thread.join(WAIT)

    assert log(DOWN_LINE) == 1
    assert wrong == []
    assert 1 <= len(failed) <= len(users), f"{len(failed)} requests waited for the Redis timeout: {failed}"
    assert [Browser(app, u.cookie).session()["count"] for u in users] == counts


def test_no_stale_read_after_redis_hung_while_sessions_changed(shared: Backends, log: Log) -> None:
    """Two processes (two stores on the same backends). While Redis hangs, both change the session
    in PostgreSQL only, so Redis keeps its older copy; once it is back, neither ever reads that."""
    app_a, app_b = shared.app(), shared.app()
    alice_a = Browser(app_a)
    alice_a.login("alice")
    alice_b = Browser(app_b, alice_a.cookie)
    assert alice_b.session() == {"user": "alice", "count": 0}  # in Redis; B's probe runs too
    shared.redis.pause()
    try:
        for browser in (alice_a, alice_b, alice_a, alice_b, alice_a):
            assert browser.counter().status == 303
        # Both notice (the probe of a process without requests too) and read PostgreSQL.
        wait_until(lambda: log(DOWN_LINE) == 2, "both processes marked Redis down")
        assert alice_a.session()["count"] == 5
        assert alice_b.session()["count"] == 5
    finally:
        shared.redis.resume()

    stores = [app_a.store, app_b.store]
    stale: list[int] = []
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:  # until both serve from Redis, and a little longer
        for browser in (alice_a, alice_b):
            count = browser.session()["count"]
            if count != 5:
                stale.append(count)
        if all(s.serving_from == "Redis" for s in stores):  # type: ignore[attr-defined]
            break
        time.sleep(0.01)
    for _ in range(20):
        for browser in (alice_a, alice_b):
            count = browser.session()["count"]
            if count != 5:
                stale.append(count)
    assert stale == [], "stale counts read after Redis came back"
    assert all(s.serving_from == "Redis" for s in stores)  # type: ignore[attr-defined]
    alice_b.counter()
    assert alice_a.session()["count"] == 6


# -- PostgreSQL outages ------------------------------------------------------------------------


def test_postgres_down_keeps_sessions_in_redis_and_copies_them_back(
    private: Backends, private_pg: PostgresServer, log: Log
) -> None:
    store = private.store()
    app = private.app(store)
    alice, carol = Browser(app), Browser(app)
    alice.login("alice")
    carol.login("carol")
    alice.counter()
    carol_key = carol.key
    private_pg.stop()

    alice.counter()
    alice.counter()
    assert alice.session() == {"user": "alice", "count": 3}
    bob = Browser(app)
    bob.login("bob")  # a new session while PostgreSQL is away
    assert bob.session()["user"] == "bob"
    assert carol.request("POST", "/logout").status == 303
    assert Browser(app, carol.cookie).session()["user"] is None
    assert log(PG_DOWN_LINE) == 1
    assert log(DOWN_LINE) == 0

    private_pg.start()
    wait_until(lambda: log(PG_BACK_LINE) > 0, "PostgreSQL noticed back")
    assert log.lines(PG_BACK_LINE) == ["PostgreSQL is back: 2 sessions copied to it from Redis"]  # alice, bob
    durable = store.durable
    assert durable.load(alice.key).data == {"user": "alice", "count": 3}  # type: ignore[union-attr]
    assert durable.load(bob.key).data == {"user": "bob"}  # type: ignore[union-attr]
    assert durable.load(carol_key) is None, "a logout made while PostgreSQL was away came back"
    # What a user sees: Redis loses everything, PostgreSQL still has the latest.
    private.flushall()
    assert alice.session() == {"user": "alice", "count": 3}
    assert bob.session()["user"] == "bob"


# -- both down -----------------------------------------------------------------------------------


def assert_empty_unsaved(browser: Browser) -> None:
    """While nothing can be loaded: an empty session, the cookie left alone, no 5xx."""
    cookie = browser.cookie
    response = browser.request("GET", "/api/session")
    assert response.status == 200
    assert json.loads(response.body) == {"user": None, "count": 0}
    assert response.set_cookie is None
    response = browser.counter()
    assert response.status == 303
    assert response.set_cookie is None, "a session that could not be loaded was replaced"
    assert browser.cookie == cookie


def test_both_down_answers_with_an_empty_session_and_keeps_the_user_logged_in(
    private: Backends, private_pg: PostgresServer, log: Log
) -> None:
    store = private.store()
    app = private.app(store)
    alice = Browser(app)
    alice.login("alice")
    alice.counter()
    private.redis.kill()
    assert alice.session() == {"user": "alice", "count": 1}  # from PostgreSQL
    private_pg.stop()

    for _ in range(5):
        assert_empty_unsaved(alice)
    stranger = Browser(app)
    assert stranger.request("POST", "/login", {"username": "mallory"}).status == 303  # nothing can be saved
    assert stranger.cookie is None
    assert log(BOTH_LINE) == 1
    time.sleep(3 * PROBE)  # the probe keeps failing: still one line
    assert log(BOTH_LINE) == 1

    private_pg.start()
    private.redis.start()
    wait_until(lambda: store.serving_from == "Redis", "back to Redis")
    assert alice.session() == {"user": "alice", "count": 1}
    alice.counter()
    assert alice.session() == {"user": "alice", "count": 2}
    assert log(BOTH_LINE) == 1


def test_postgres_back_while_redis_is_still_down_serves_sessions_again(
    private: Backends, private_pg: PostgresServer, log: Log
) -> None:
    """PostgreSQL goes first (the change is kept in Redis), then Redis dies too. PostgreSQL returns:
    its copy is older than the one Redis lost, but it is the session, and the user is logged in."""
    store = private.store()
    app = private.app(store)
    alice = Browser(app)
    alice.login("alice")
    alice.counter()
    private_pg.stop()
    alice.counter()  # in Redis only
    private.redis.kill()
    assert_empty_unsaved(alice)
    assert log(BOTH_LINE) == 1

    private_pg.start()
    try:
        wait_until(lambda: alice.session()["user"] == "alice", "logged in again from PostgreSQL", timeout=10 * PROBE)
    finally:
        private.redis.start()
    assert alice.session()["count"] == 1  # PostgreSQL's copy: the later count lived in the killed Redis only


def test_session_lost_by_redis_while_postgres_was_away_is_not_deleted_from_postgres(
    private: Backends, private_pg: PostgresServer, log: Log
) -> None:
    """PostgreSQL goes away; a change lands in Redis only; Redis restarts empty. When PostgreSQL is
    back, the change is lost (both copies were unreachable), but the session must not be: its
    older copy in PostgreSQL is all there is."""
    store = private.store()
    app = private.app(store)
    alice = Browser(app)
    alice.login("alice")
    alice.counter()
    private_pg.stop()
    alice.counter()  # in Redis only
    private.redis.kill()
    private.redis.start()  # empty
    private_pg.start()
    wait_until(lambda: log(PG_BACK_LINE) > 0 and store.serving_from == "Redis", "both back")
    assert alice.session()["user"] == "alice", "the user was logged out after both stores came back"


def test_redis_restarted_while_postgres_is_away_serves_and_is_checked_when_postgres_is_back(
    private: Backends, private_pg: PostgresServer, log: Log
) -> None:
    """With PostgreSQL away, a Redis that changed servers is the only store left: it serves (new
    logins work), and the change is marked once PostgreSQL is back, after what Redis alone holds
    has been copied to it."""
    store = private.store()
    app = private.app(store)
    alice = Browser(app)
    alice.login("alice")
    time.sleep(2 * PROBE)  # the probe has seen the server
    private_pg.stop()
    alice.counter()  # PostgreSQL noticed away; Redis only
    private.redis.kill()
    private.redis.start()  # another server, empty
    bob = Browser(app)

    def bob_logs_in() -> bool:
        if bob.cookie is None:
            bob.request("POST", "/login", {"username": "bob"})  # not saved while Redis is distrusted
        return bob.cookie is not None and bob.session()["user"] == "bob"

    wait_until(bob_logs_in, "a login with Redis alone, after it changed servers")
    private_pg.start()
    wait_until(lambda: log(CHANGED_LINE) == 1 and store.serving_from == "Redis", "the change marked, Redis used")
    assert bob.session()["user"] == "bob", "what Redis alone held was dropped before PostgreSQL had it"
    assert store.durable.load(bob.key) is not None  # type: ignore[attr-defined]


# -- every process of every host: the marks in PostgreSQL -------------------------------------------

BOUND = 2 * PROBE  # what the README promises: every process reads an acknowledged write within this


@pytest.fixture
def proxy(private_redis: RedisServer) -> Iterator[Proxy]:
    """A TCP proxy to the private Redis, for one process ("host") to reach it through."""
    with running(Proxy(private_redis.port)) as server:
        yield server


def test_a_host_cut_off_from_redis_is_read_by_every_host_within_the_bound(
    shared: Backends, proxy: Proxy, log: Log
) -> None:
    """Host A reaches Redis through a proxy that is cut for as long as the test lasts; host B keeps
    Redis. What A acknowledges, increments and then a logout, B reads within the bound."""
    app_a, app_b = shared.app(shared.store(proxy.url)), shared.app()
    alice_b = Browser(app_b)
    alice_b.login("alice")
    alice_b.counter()
    alice_a = Browser(app_a, alice_b.cookie)
    assert alice_a.session()["count"] == 1  # from Redis
    proxy.cut()

    for _ in range(3):
        assert alice_a.counter().status == 303  # the first waits for the timeout, then PostgreSQL alone
    assert log(DOWN_LINE) == 1, "host A alone lost Redis"
    time.sleep(BOUND)
    assert alice_b.session()["count"] == 4, "host B still serves Redis's older copy"
    # Host B keeps writing to Redis, and reads PostgreSQL while host A writes around Redis.
    assert app_b.store.status()["stores"]["Redis"]["state"] == "returning"  # type: ignore[attr-defined]

    stolen = alice_a.cookie
    assert alice_a.request("POST", "/logout").status == 303
    time.sleep(BOUND)
    assert Browser(app_b, stolen).session()["user"] is None, "host B still serves a session host A logged out"

    proxy.heal()
    for app in (app_a, app_b):
        wait_until(lambda app=app: app.store.serving_from == "Redis", "back on Redis")  # type: ignore[attr-defined]
    assert log(DOWN_LINE) == 1, "host B never lost Redis"
    for app in (app_a, app_b):
        assert Browser(app, stolen).session()["user"] is None, "a logout was undone when the partition ended"
    assert app_a.store.durable.count_stale() == 0  # type: ignore[attr-defined]


def test_a_blip_one_process_saw_is_read_by_the_others_within_the_bound(shared: Backends, proxy: Proxy) -> None:
    """An outage shorter than a probe interval, seen by host A only (its request timed out)."""
    app_a, app_b = shared.app(shared.store(proxy.url)), shared.app()
    alice = Browser(app_b)
    alice.login("alice")
    alice_a = Browser(app_a, alice.cookie)
    assert alice_a.session()["user"] == "alice"
    proxy.cut()
    assert alice_a.counter().status == 303  # times out on Redis, written to PostgreSQL alone
    proxy.heal()
    time.sleep(BOUND)
    assert alice.session()["count"] == 1, "host B reads Redis's older copy after the blip"
    assert alice_a.session()["count"] == 1


def test_sibling_processes_of_a_host_read_a_write_around_redis_at_once(shared: Backends, proxy: Proxy) -> None:
    """Processes of one host (one ``host`` name): one of them cannot reach Redis and writes to
    PostgreSQL alone; a sibling reads the new value at once, with no probe in between (the probes
    here run every minute), though Redis still holds the older copy. A process of another host
    reads that copy until its probe drops it: the bound."""
    host = unique("host")
    store_a = shared.store(proxy.url, host=host, probe_interval=60)
    store_b = shared.store(host=host, probe_interval=60)
    other_host = shared.store(host=unique("host"), probe_interval=60)
    alice = Browser(shared.app(store_b))
    alice.login("alice")
    alice.counter()
    elsewhere = Browser(shared.app(other_host), alice.cookie)
    assert elsewhere.session()["count"] == 1  # its first use is over: it probed once
    proxy.cut()
    assert Browser(shared.app(store_a), alice.cookie).counter().status == 303  # to PostgreSQL alone
    assert store_b.cache.load(alice.key).data["count"] == 1  # type: ignore[union-attr]
    assert alice.session()["count"] == 2, "a sibling process read Redis's older copy"
    assert elsewhere.session()["count"] == 1  # another host, within the bound


def test_a_new_process_drops_marked_copies_before_its_first_read(shared: Backends, proxy: Proxy) -> None:
    """A worker started while another wrote around Redis (recycled, redeployed) does not serve
    the older copy before its probe has run: it drops the marked copies first."""
    store_a = shared.store(proxy.url, probe_interval=60)
    alice = Browser(shared.app(store_a))
    alice.login("alice")
    proxy.cut()
    assert alice.counter().status == 303  # to PostgreSQL alone, marked
    new_worker = shared.store(probe_interval=60)
    assert Browser(shared.app(new_worker), alice.cookie).session()["count"] == 1
    assert new_worker.durable.count_stale() == 0  # type: ignore[attr-defined]


def test_marks_outlive_the_process_that_made_them(shared: Backends, log: Log) -> None:
    """A process changes sessions while Redis hangs, and exits before Redis answers again: no
    other process reads Redis's older copies once the bound has passed after it answers."""
    store_a = shared.store()
    app_a, app_b = shared.app(store_a), shared.app()
    alice, bob = Browser(app_a), Browser(app_a)
    alice.login("alice")
    alice.counter()
    bob.login("bob")
    assert Browser(app_b, alice.cookie).session()["count"] == 1  # B uses the store too
    shared.redis.pause()
    try:
        assert alice.counter().status == 303
        assert alice.counter().status == 303
        stolen = bob.cookie
        assert bob.request("POST", "/logout").status == 303
        store_a.close()  # the worker exits (recycled, crashed, redeployed) with Redis still away
    finally:
        shared.redis.resume()
    wait_until(lambda: app_b.store.serving_from == "Redis", "host B back on Redis")  # type: ignore[attr-defined]
    time.sleep(BOUND)
    assert Browser(app_b, alice.cookie).session()["count"] == 3, "an acknowledged increment was undone"
    assert Browser(app_b, stolen).session()["user"] is None, "a logout was undone"


def test_redis_restored_from_a_snapshot_serves_no_older_copy(shared: Backends, log: Log) -> None:
    """Redis restarts from an older snapshot: another server, which may have lost any write."""
    store = shared.store()
    app = shared.app(store)
    alice, carol = Browser(app), Browser(app)
    alice.login("alice")
    alice.counter()
    carol.login("carol")
    time.sleep(2 * PROBE)  # the probe has seen the server
    shared.redis.save()  # the snapshot: alice at 1, carol logged in
    alice.counter()
    alice.counter()
    stolen = carol.cookie
    assert carol.request("POST", "/logout").status == 303
    shared.redis.kill()
    shared.redis.start()  # reloads the snapshot
    time.sleep(BOUND)
    assert alice.session()["count"] == 3, "an acknowledged increment was undone by the snapshot"
    assert Browser(app, stolen).session()["user"] is None, "a logout was undone by the snapshot"
    assert log(CHANGED_LINE) == 1
    wait_until(lambda: store.serving_from == "Redis", "back on Redis")
    assert alice.session()["count"] == 3


def test_a_restarted_redis_is_not_read_before_it_is_checked(shared: Backends) -> None:
    """Redis restarts from an older snapshot while a process, between two probes, does not look:
    its next read must not come from the restarted server, which redis-py reconnects to without a
    word (a RedisStore whose server no failover checks does read the older copy)."""
    store = shared.store(probe_interval=60)
    unchecked = RedisStore(shared.redis.url, prefix=shared.prefix, timeout=TIMEOUT)
    alice = Browser(shared.app(store))
    alice.login("alice")
    alice.counter()
    key = alice.key
    shared.redis.save()  # count 1
    alice.counter()
    alice.counter()
    assert unchecked.load(key).data["count"] == 3  # type: ignore[union-attr]
    shared.redis.kill()
    shared.redis.start()
    assert unchecked.load(key).data["count"] == 1  # type: ignore[union-attr]  # the older copy, unnoticed
    unchecked.close()
    assert alice.session()["count"] == 3, "read the restarted server's older copy before checking it"
    assert store.serving_from == "PostgreSQL"


class Hooked(RedisStore):
    """A RedisStore that runs ``on_expect`` when the probe tells it which server to expect next, and
    pauses its next load (``pause_load``) until a copy is to be dropped from it (``clear``)."""

    on_expect: Callable[[], object] | None = None
    pause_load = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.loading, self.go_on, self.loaded = threading.Event(), threading.Event(), threading.Event()

    def expect(self, server: str) -> None:
        super().expect(server)
        hook, self.on_expect = self.on_expect, None
        if hook is not None:
            hook()

    def load(self, key: str) -> Record | None:
        if self.pause_load:
            self.pause_load = False
            self.loading.set()
            self.go_on.wait(WAIT)
        return super().load(key)

    def clear(self) -> None:
        self.go_on.set()  # a paused read goes on now, and reads before the copies are gone
        self.loaded.wait(WAIT)
        super().clear()


def restarted_from_before_a_logout(shared: Backends) -> tuple[FailoverStore, Hooked]:
    """A process (whose probe runs only when the test says) that saw a session, then its logout, after
    which Redis restarted from a snapshot taken before the logout."""
    cache = Hooked(shared.redis.url, prefix=shared.prefix, timeout=TIMEOUT)
    durable = PostgresStore(shared.database_url, table=shared.table, cleanup_interval=0, driver=shared.driver)
    store = FailoverStore(cache, durable, probe_interval=60)
    shared.stores.append(store)
    store.create("k", {"user": '"carol"'}, 600)
    assert store.load("k") is not None  # the first probe: this server is the one expected
    shared.redis.save()
    store.delete("k")  # the logout
    shared.redis.kill()
    shared.redis.start()  # reloads the snapshot: the session is there again
    return store, cache


def test_a_read_as_the_probe_finds_a_restarted_redis_is_not_served_from_it(shared: Backends) -> None:
    """A request that decides where to read just as the probe has told the cache to expect the new
    server, before it dropped the copies: the read must not come from that server."""
    store, cache = restarted_from_before_a_logout(shared)
    seen: list[Record | None] = []
    cache.on_expect = lambda: seen.append(store.load("k"))
    cache.go_on.set()
    cache.loaded.set()
    store._check()  # the probe
    assert seen == [None], "a logout was undone by a read between the probe's check and its drop"


def test_a_read_in_flight_when_the_probe_finds_a_restarted_redis_is_not_served_from_it(shared: Backends) -> None:
    """A request that chose to read Redis before the probe found it restarted, and reads it (through a
    new connection, to the server now expected) before the probe dropped the copies."""
    store, cache = restarted_from_before_a_logout(shared)
    seen: list[Record | None] = []
    cache.pause_load = True

    def request() -> None:
        try:
            seen.append(store.load("k"))
        finally:
            cache.loaded.set()

    reader = threading.Thread(target=request)
    reader.start()
    assert cache.loading.wait(WAIT)
    store._check()  # the probe, while the read waits
    reader.join(WAIT)
    assert seen == [None], "a logout was undone by a read in flight across the probe"


# -- gray failures --------------------------------------------------------------------------------


def timed(action: Callable[[], object]) -> float:
    started = time.monotonic()
    action()
    return time.monotonic() - started


def test_slow_redis_moves_reads_to_postgres_and_back(shared: Backends, proxy: Proxy, log: Log) -> None:
    """Every reply late (past the latency budget, within the timeout): PostgreSQL serves until
    Redis is fast again, and only the first few requests pay the delay."""
    store = shared.store(proxy.url)
    alice = Browser(shared.app(store))
    alice.login("alice")
    proxy.delay(0.15)  # budget 0.1 s, timeout 0.3 s
    slow = sum(timed(alice.counter) >= 0.15 for _ in range(20))
    assert store.serving_from == "PostgreSQL"
    assert log(SLOW_LINE) == 1
    assert slow <= 4, f"{slow} of 20 requests waited for the slow Redis"
    assert alice.session()["count"] == 20
    time.sleep(3 * PROBE)
    assert store.serving_from == "PostgreSQL", "moved back to a Redis that is still slow"
    proxy.heal()
    wait_until(lambda: store.serving_from == "Redis", "back on Redis once fast")
    assert log(BACK_LINE) == 1
    assert alice.session()["count"] == 20


def test_redis_hanging_one_command_in_ten(shared: Backends, proxy: Proxy, log: Log) -> None:
    """One command in ten never answers: a request waits at most one timeout, few do, and the
    process does not switch back and forth at every probe."""
    store = shared.store(proxy.url)
    alice = Browser(shared.app(store))
    alice.login("alice")
    proxy.hang_one_in(10)
    durations = []
    deadline = time.monotonic() + 4
    while time.monotonic() < deadline and len(durations) < 400:
        durations.append(timed(alice.counter))
    assert alice.session()["count"] == len(durations)
    waited = sum(d >= TIMEOUT for d in durations)
    assert max(durations) < 2 * TIMEOUT + 0.2, "a request waited for more than one timeout"
    assert waited <= 6, f"{waited} of {len(durations)} requests waited for a hung command"
    assert log(DOWN_LINE) <= 6, f"switched down {log(DOWN_LINE)} times in 4 s: flapping"
    proxy.heal()
    wait_until(lambda: store.serving_from == "Redis", "back on Redis once healed", timeout=MAX_HOLD * PROBE + WAIT)


# -- what operators see ------------------------------------------------------------------------------


def get_status(store: FailoverStore) -> tuple[int, dict[str, Any]]:
    app_iter, status, _ = run_wsgi_app(status_app(store), create_environ("/status"), buffered=True)
    return int(status.split()[0]), json.loads(b"".join(app_iter))


def switches(to: str) -> float:
    return prometheus_client.REGISTRY.get_sample_value("wsgisession_switches_total", {"store": "Redis", "to": to}) or 0


def test_status_and_metrics_tell_which_store_serves_and_what_awaits(shared: Backends, proxy: Proxy) -> None:
    store = shared.store(proxy.url)
    alice = Browser(shared.app(store))
    alice.login("alice")
    code, status = get_status(store)
    assert code == 200
    assert status["serving"] == "Redis" and status["awaiting_drop"] == 0
    assert status["stores"]["Redis"]["state"] == "up" and status["stores"]["PostgreSQL"]["state"] == "up"
    downs, ups = switches("down"), switches("up")

    proxy.cut()
    alice.counter()
    alice.counter()
    code, status = get_status(store)
    assert code == 200  # PostgreSQL serves
    assert status["serving"] == "PostgreSQL"
    assert status["stores"]["Redis"] | {"since": 0, "latency_ms": 0} == {
        "state": "down", "since": 0, "switches": 1, "failures": status["stores"]["Redis"]["failures"], "latency_ms": 0,
    }  # fmt: skip
    assert status["stores"]["Redis"]["failures"] >= 1
    assert status["awaiting_drop"] >= 2  # nobody reaches Redis to drop them
    assert switches("down") == downs + 1

    proxy.heal()
    wait_until(lambda: store.serving_from == "Redis", "back on Redis")
    code, status = get_status(store)
    assert (code, status["serving"], status["awaiting_drop"]) == (200, "Redis", 0)
    assert status["stores"]["Redis"]["switches"] == 3  # down, returning (written, not read), up
    assert switches("up") == ups + 1
