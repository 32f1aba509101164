"""Store round trips per request, counted at the wire (not timed).

- Redis: the client's connections are a subclass of ``redis.Connection`` that counts every packet
  of commands it sends after its handshake (a pipeline is one send, so one round trip), and the
  connections it opens. The server is a private redis-server, so nothing else is loaded on it.
- PostgreSQL: the store connects through a TCP proxy that reads the frontend protocol and
  counts the queries that go by (and the connections opened), so implicit statements (a BEGIN
  or COMMIT the driver might send on its own) are counted too.

Redis runs on each server kind, PostgreSQL on each driver, FailoverStore on each of servers.PAIRS.

Expected, per request, once connections are open:

=================================  =====  ==========  ==========================================
request                            Redis  PostgreSQL  Redis + PostgreSQL (FailoverStore)
=================================  =====  ==========  ==========================================
logged-in read                     1      1           1 (Redis)
read and write                     2      2           3: load, durable write, then Redis write
never touches the session          0      0           0
reads before the refresh is due    1      1           1 each
read when the refresh is due       2      2           3 (load, touch on both), then 1 again
login (new session, no cookie)     1      1           2 (one write to each)
=================================  =====  ==========  ==========================================
"""

from __future__ import annotations

import contextlib
import json
import socket
import struct
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
import psycopg2
import pytest
import redis
from servers import PAIRS, PG_DRIVERS, REDIS_KINDS, SECRET, RedisServer, drop_table, require_postgres, unique
from werkzeug.test import create_environ, run_wsgi_app

from wsgisession import SessionMiddleware, SessionStore
from wsgisession.signing import ID_LENGTH, store_key
from wsgisession.stores.failover import FailoverStore
from wsgisession.stores.postgres import PostgresStore
from wsgisession.stores.redis import RedisStore

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIEnvironment

# (store, Redis server kind, PostgreSQL driver): Redis on each server kind, PostgreSQL on each driver,
# FailoverStore on each of servers.PAIRS.
KINDS = [*(("redis", kind, None) for kind in REDIS_KINDS), *(("postgres", None, driver) for driver in PG_DRIVERS),
         *(("failover", kind, driver) for kind, driver in PAIRS)]  # fmt: skip
MAX_AGE = 3600.0


# -- counting at the wire ----------------------------------------------------------------


@dataclass
class Wire:
    """What one backend was sent: round trips (with what each carried) and connections opened."""

    trips: list[str] = field(default_factory=list)
    connects: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def trip(self, what: str) -> None:
        with self.lock:
            self.trips.append(what)

    def connected(self) -> None:
        with self.lock:
            self.connects += 1


def counting_redis(url: str, wire: Wire) -> redis.Redis:
    """A client whose connections report each send (one round trip) to ``wire``."""

    class CountingConnection(redis.Connection):
        _handshaking = False

        def _handshake(self, step: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
            """AUTH, HELLO, CLIENT SETINFO...: once per connection, not per request."""
            if self._handshaking:
                return step(*args, **kwargs)
            wire.connected()
            self._handshaking = True
            try:
                return step(*args, **kwargs)
            finally:
                self._handshaking = False

        def on_connect(self, *args: Any, **kwargs: Any) -> Any:
            return self._handshake(super().on_connect, *args, **kwargs)

        if hasattr(redis.Connection, "on_connect_check_health"):  # redis-py 6+ calls it directly

            def on_connect_check_health(self, *args: Any, **kwargs: Any) -> Any:
                return self._handshake(super().on_connect_check_health, *args, **kwargs)

        def send_packed_command(self, command: Any, check_health: bool = True) -> None:
            if not self._handshaking:
                wire.trip(" ".join(_resp_commands(command)))
            super().send_packed_command(command, check_health)

    parts = urlsplit(url)
    return redis.Redis(
        connection_pool=redis.ConnectionPool(
            connection_class=CountingConnection, host=parts.hostname, port=parts.port, socket_timeout=5
        )
    )


def _resp_commands(packed: Any) -> list[str]:
    """The command names in a packet of RESP arrays (for the failure messages)."""
    data = packed.encode() if isinstance(packed, str) else b"".join(bytes(p) for p in packed)
    names, pos = [], 0
    while pos < len(data) and data[pos : pos + 1] == b"*":
        end = data.index(b"\r\n", pos)
        count, pos = int(data[pos + 1 : end]), end + 2
        for i in range(count):
            end = data.index(b"\r\n", pos)
            length = int(data[pos + 1 : end])
            if i == 0:
                names.append(data[end + 2 : end + 2 + length].decode().upper())
            pos = end + 2 + length + 2
    return names


class PostgresProxy:
    """A TCP proxy to PostgreSQL that counts the queries its clients send."""

    _SSL, _GSS, _CANCEL = 80877103, 80877104, 80877102

    def __init__(self, upstream: tuple[str, int], wire: Wire) -> None:
        self.upstream = upstream
        self.wire = wire
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        self.listener.close()
        for sock in self.sockets:
            with contextlib.suppress(OSError):
                sock.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.upstream, timeout=10)
            client.settimeout(None)
            server.settimeout(None)
            self.sockets += [client, server]
            self.wire.connected()
            threading.Thread(target=self._frontend, args=(client, server), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while chunk := source.recv(65536):
                sink.sendall(chunk)
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)

    def _frontend(self, client: socket.socket, server: socket.socket) -> None:
        """Forward the client's bytes, noting each simple query ('Q') and each extended-protocol Sync ('S')."""
        buffer, started = b"", False
        with contextlib.suppress(OSError):
            while chunk := client.recv(65536):
                server.sendall(chunk)
                buffer += chunk
                while True:
                    if not started:  # untyped: SSL/GSS/cancel requests, then the startup message
                        if len(buffer) < 8:
                            break
                        length, code = struct.unpack("!ii", buffer[:8])
                        if len(buffer) < length:
                            break
                        started = code not in (self._SSL, self._GSS, self._CANCEL)
                        buffer = buffer[length:]
                        continue
                    if len(buffer) < 5:
                        break
                    kind, length = buffer[:1], struct.unpack("!i", buffer[1:5])[0]
                    if len(buffer) < 1 + length:
                        break
                    body, buffer = buffer[5 : 1 + length], buffer[1 + length :]
                    if kind == b"Q":
                        self.wire.trip(body.rstrip(b"\0").decode(errors="replace"))
                    elif kind == b"S":
                        self.wire.trip("(extended-protocol Sync)")
        with contextlib.suppress(OSError):
            server.shutdown(socket.SHUT_WR)


# -- the stores under count ------------------------------------------------------------


@dataclass
class Counted:
    """A middleware over a store whose traffic is counted, per backend."""

    kind: str
    store: SessionStore
    wires: dict[str, Wire]
    app: SessionMiddleware = field(init=False)

    def __post_init__(self) -> None:
        self.app = SessionMiddleware(demo_app, self.store, secret=SECRET, max_age=MAX_AGE)

    @contextlib.contextmanager
    def counting(self) -> Iterator[dict[str, list[str]]]:
        """Yield, filled in at the end of the block, the round trips each backend saw during it."""
        seen: dict[str, list[str]] = {}
        before = {name: (len(w.trips), w.connects) for name, w in self.wires.items()}
        yield seen
        for name, wire in self.wires.items():
            trips, connects = before[name]
            seen[name] = wire.trips[trips:]
            assert wire.connects == connects, f"{name}: a request opened a new connection"


@pytest.fixture(scope="module")
def redis_servers() -> Iterator[dict[str, RedisServer]]:
    """A private server of each kind, for the module (started here, so that nothing else loads it)."""
    servers = {kind: RedisServer(kind) for kind in REDIS_KINDS}
    try:
        for server in servers.values():
            server.start()
        yield servers
    finally:
        for server in servers.values():
            server.close()


@pytest.fixture
def counted(request: pytest.FixtureRequest, redis_servers: dict[str, RedisServer]) -> Iterator[Counted]:
    kind, server_kind, driver = request.param
    wires: dict[str, Wire] = {}
    cleanups: list[Callable[[], None]] = []
    stores: list[SessionStore] = []
    try:
        if kind in ("redis", "failover"):
            wires["redis"] = Wire()
            client = counting_redis(redis_servers[server_kind].url, wires["redis"])
            cleanups.append(client.close)
            stores.append(RedisStore(client=client, prefix=unique("rt") + ":"))
        if kind in ("postgres", "failover"):
            url = require_postgres()
            parts = urlsplit(url)
            wires["postgres"] = Wire()
            proxy = PostgresProxy((parts.hostname or "127.0.0.1", parts.port or 5432), wires["postgres"])
            cleanups.append(proxy.close)
            table = unique("rt")
            cleanups.append(lambda: drop_table(url, table))
            stores.append(PostgresStore(through(url, proxy.port), table=table, cleanup_interval=0, driver=driver))
        # A long probe interval: the failover probe sends nothing while requests are counted.
        store = stores[0] if len(stores) == 1 else FailoverStore(stores[0], stores[1], probe_interval=3600)
        cleanups.append(store.close)
        counted = Counted(kind, store, wires)
        # Warm up: open the connections, and load the Redis update script (the first update on a
        # fresh server costs a NOSCRIPT reply and an EVAL, once per server start).
        cookie = login(counted)
        call(counted, "/write", cookie)
        yield counted
    finally:
        for cleanup in reversed(cleanups):
            cleanup()


def through(url: str, port: int) -> str:
    """``url`` with its host and port replaced by the proxy's; no SSL or GSS (the proxy reads the traffic)."""
    parts = urlsplit(url)
    userinfo = parts.netloc.rpartition("@")[0]
    netloc = f"{userinfo}@127.0.0.1:{port}" if userinfo else f"127.0.0.1:{port}"
    query = "&".join(q for q in (parts.query, "sslmode=disable&gssencmode=disable") if q)
    return urlunsplit((parts.scheme, netloc, parts.path, query, ""))


def demo_app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
    session = environ["session"]
    path = environ["PATH_INFO"]
    body = b"ok"
    if path == "/login":
        session["user_id"] = 42
        session["counter"] = 0
    elif path == "/read":
        body = str(session["user_id"]).encode()
    elif path == "/write":
        session["counter"] += 1
        body = str(session["counter"]).encode()
    elif path == "/peek":  # a visitor without a session: the app looks, finds nothing
        body = str(session.get("user_id")).encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]


def call(counted: Counted, path: str, cookie: str | None = None) -> tuple[bytes, list[str]]:
    environ = create_environ(path, headers={"Cookie": cookie} if cookie else {})
    body, status, headers = run_wsgi_app(counted.app, environ, buffered=True)
    assert status.startswith("200"), status
    return b"".join(body), headers.getlist("Set-Cookie")


def login(counted: Counted) -> str:
    _, cookies = call(counted, "/login")
    assert len(cookies) == 1, cookies
    return cookies[0].split(";", 1)[0]


def totals(seen: dict[str, list[str]]) -> dict[str, int]:
    return {name: len(trips) for name, trips in seen.items()}


def expect(kind: str, one: int, failover: tuple[int, int]) -> dict[str, int]:
    """Round trips per backend: ``one`` for a single store, ``failover`` = (Redis, PostgreSQL) for FailoverStore."""
    if kind == "failover":
        return {"redis": failover[0], "postgres": failover[1]}
    return {kind: one}


by_kind = pytest.mark.parametrize("counted", KINDS, indirect=True, ids=lambda kind: "-".join(filter(None, kind)))


# -- the counts --------------------------------------------------------------------------


@by_kind
def test_a_logged_in_read_is_one_round_trip(counted: Counted) -> None:
    cookie = login(counted)
    with counted.counting() as seen:
        body, cookies = call(counted, "/read", cookie)
    assert body == b"42"
    assert cookies == []
    # FailoverStore reads from Redis alone: PostgreSQL holds a copy but is not asked.
    assert totals(seen) == expect(counted.kind, 1, (1, 0)), seen


@by_kind
def test_a_read_and_write_is_a_load_and_one_atomic_save(counted: Counted) -> None:
    cookie = login(counted)
    with counted.counting() as seen:
        body, cookies = call(counted, "/write", cookie)
    assert body == b"1"
    assert len(cookies) == 1  # the rolling expiry was extended with the write
    # FailoverStore: the load from Redis, the write to PostgreSQL (first, the durable copy), then to Redis.
    assert totals(seen) == expect(counted.kind, 2, (2, 1)), seen
    assert call(counted, "/write", cookie)[0] == b"2"


@by_kind
def test_a_request_that_never_touches_the_session_costs_nothing(counted: Counted) -> None:
    cookie = login(counted)
    with counted.counting() as seen:
        _, cookies = call(counted, "/untouched", cookie)
        _, new_visitor = call(counted, "/untouched")
    assert cookies == new_visitor == []
    assert totals(seen) == expect(counted.kind, 0, (0, 0)), seen


@by_kind
def test_a_visitor_without_a_cookie_costs_nothing(counted: Counted) -> None:
    with counted.counting() as seen:
        body, cookies = call(counted, "/peek")
        tampered, _ = call(counted, "/peek", "session=" + "A" * ID_LENGTH + ".1700000000." + "B" * ID_LENGTH)
    assert body == tampered == b"None"
    assert cookies == []
    assert totals(seen) == expect(counted.kind, 0, (0, 0)), seen


@by_kind
def test_reads_before_the_expiry_refresh_is_due_add_no_round_trip(counted: Counted) -> None:
    cookie = login(counted)
    with counted.counting() as seen:
        for _ in range(10):
            body, cookies = call(counted, "/read", cookie)
            assert body == b"42"
            assert cookies == []
    assert totals(seen) == expect(counted.kind, 10, (10, 0)), seen


@by_kind
def test_a_due_expiry_refresh_costs_one_write_once(counted: Counted) -> None:
    cookie = login(counted)
    # The session was last extended long enough ago: half its life is left.
    session_id = cookie.partition("=")[2][:ID_LENGTH]
    assert counted.store.touch(store_key(session_id), MAX_AGE / 2)
    with counted.counting() as due:
        _, cookies = call(counted, "/read", cookie)
    assert len(cookies) == 1  # the cookie's Max-Age is extended with the record
    with counted.counting() as after:
        _, cookies = call(counted, "/read", cookie)
    assert cookies == []
    # The touch goes to both stores of a FailoverStore.
    assert totals(due) == expect(counted.kind, 2, (2, 1)), due
    assert totals(after) == expect(counted.kind, 1, (1, 0)), after


@by_kind
def test_a_login_writes_once(counted: Counted) -> None:
    with counted.counting() as seen:
        cookie = login(counted)
    assert call(counted, "/read", cookie)[0] == b"42"
    # No cookie, so no load: one write (a MULTI pipeline in Redis, an upsert in PostgreSQL), to each store.
    assert totals(seen) == expect(counted.kind, 1, (1, 1)), seen


def test_the_counters_see_every_send(redis_servers: dict[str, RedisServer]) -> None:
    """The Redis counter counts sends, not commands, and sees plain commands as well as pipelines."""
    wire = Wire()
    client = counting_redis(redis_servers["redis"].url, wire)
    key = unique("rt")
    client.set(key, json.dumps({"a": 1}))
    pipe = client.pipeline(transaction=False)
    pipe.get(key)
    pipe.pttl(key)
    pipe.execute()
    client.delete(key)
    client.close()
    assert wire.trips == ["SET", "GET PTTL", "DEL"]
    assert wire.connects == 1


@pytest.mark.parametrize(
    ("driver", "select"), [(psycopg, "(extended-protocol Sync)"), (psycopg2, "SELECT 1")], ids=["psycopg", "psycopg2"]
)
def test_the_proxy_sees_statements_the_driver_sends_on_its_own(driver: Any, select: str) -> None:
    """Outside autocommit the driver sends BEGIN and COMMIT by itself: the proxy counts them too, and a query
    with parameters, which psycopg2 sends as text and psycopg 3 in the extended protocol (counted by its Sync)."""
    url = require_postgres()
    parts = urlsplit(url)
    wire = Wire()
    proxy = PostgresProxy((parts.hostname or "127.0.0.1", parts.port or 5432), wire)
    try:
        conn = driver.connect(through(url, proxy.port))
        with conn.cursor() as cur:
            cur.execute("SELECT %s", (1,))
            cur.fetchone()
        conn.commit()
        conn.close()
    finally:
        proxy.close()
    assert wire.trips == ["BEGIN", select, "COMMIT"]
    assert wire.connects == 1
