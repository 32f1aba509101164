"""A user's sessions in Redis: the store contract on one server (Redis, and Valkey), behind Sentinels
and on a three-node cluster (real servers, redis_topologies.py); what the user index costs, counted at
the wire; how it expires and shrinks without any scan (on both server kinds); "end all" racing logins;
the express format.
"""

from __future__ import annotations

import json
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

import pytest
import redis
from redis.cluster import ClusterNode, RedisCluster
from redis_topologies import ClusterSetup, SentinelSetup
from servers import REDIS_KINDS, SECRET, RedisServer, each_redis_kind, unique
from test_failover import Browser
from test_round_trips import Wire, _resp_commands, counting_redis
from users_contract import *  # noqa: F403 - the contract's tests, run here on every Redis topology
from users_contract import binding, bound, keys_of

from wsgisession import Session, SessionMiddleware, SessionStore
from wsgisession.stores.base import USER_KEY, Changes
from wsgisession.stores.connect_redis import ConnectRedisStore
from wsgisession.stores.express import ExpressDocument
from wsgisession.stores.redis import INDEX, LAG, RedisStore

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIEnvironment

TOPOLOGIES = [*REDIS_KINDS, "sentinel", "cluster"]


# -- servers and stores -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def sentinel() -> Iterator[SentinelSetup]:
    setup = SentinelSetup().start()
    yield setup
    setup.close()


@pytest.fixture(scope="module")
def cluster() -> Iterator[ClusterSetup]:
    setup = ClusterSetup().start()
    yield setup
    setup.close()


@pytest.fixture(params=TOPOLOGIES)
def store(request: pytest.FixtureRequest, make_store: Callable[..., SessionStore]) -> Iterator[RedisStore]:
    """A RedisStore on a private prefix: of a shared server (Redis or Valkey), behind Sentinels, or on a cluster."""
    if request.param in REDIS_KINDS:
        yield make_store(f"redis-{request.param}")  # type: ignore[misc]
        return
    setup = request.getfixturevalue(request.param)
    made = RedisStore(setup.url(), prefix=unique("users") + ":")
    yield made
    made.close()


def user_id() -> str:
    """A user id of this test's own, not ASCII: the scripts name the index from the binding's JSON text."""
    return f"zoë-😀-{secrets.token_hex(4)}"


# -- the index on every topology ---------------------------------------------------------------


def test_a_session_extended_without_its_binding_stays_listed(store: RedisStore) -> None:
    """A request that changes other keys (or only extends the session) writes no binding, yet the
    session outlives its first expiry: it stays listed, and a later login does not drop it."""
    user = user_id()
    changed, touched = bound(store, user, ttl=1), bound(store, user, ttl=1)
    assert store.update(changed, Changes({"cart": "[1]"}), 600)
    assert store.touch(touched, 600)
    time.sleep(1.3)
    newest = bound(store, user)  # a login: it prunes what it takes for expired
    records = store.user_sessions(user)
    assert {record.key for record in records} == {changed, touched, newest}
    assert all(record.expires > time.time() + 500 for record in records)
    assert store.trim_user(user, 3) == []
    # On a cluster the index may lag a session's expiry by LAG, and keeps members that much longer:
    # past that, the index has been told.
    index = store.prefix + INDEX + user
    assert all(float(store.client.zscore(index, key) or 0) > (time.time() + 500) * 1000 for key in (changed, touched))


def test_sessions_gone_do_not_count_toward_the_limit(store: RedisStore) -> None:
    """Logged out, expired, or bound to someone else since: the limit counts none of them."""
    user = user_id()
    gone = [bound(store, user, ttl=900) for _ in range(3)]  # the latest to expire: the first kept, if counted
    expired = bound(store, user, ttl=0.2)
    kept = [bound(store, user) for _ in range(2)]
    store.delete(gone[0])
    store.delete_many(gone[1:2])
    store.update(gone[2], Changes({USER_KEY: binding(user_id())}), 900)
    time.sleep(0.3)
    assert store.trim_user(user, 2) == []
    assert keys_of(store, user) == set(kept)
    assert store.load(expired) is None


def test_a_session_replaced_by_another_users_leaves_the_first_users_list(store: RedisStore) -> None:
    ann, bob = user_id(), user_id()
    key = bound(store, ann)
    store.create(key, {USER_KEY: binding(bob)}, 600)
    assert keys_of(store, ann) == set() and keys_of(store, bob) == {key}
    assert store.trim_user(ann, 0) == []
    assert store.load(key) is not None


class Logins:
    """Threads that log a user in, again and again, until stopped; what each login made, and when it was done."""

    def __init__(self, store: SessionStore, user: str, threads: int) -> None:
        self.store, self.user = store, user
        self.done: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run) for _ in range(threads)]
        for thread in self._threads:
            thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            key = bound(self.store, self.user)
            self.done.append((time.monotonic(), key))

    def stop(self) -> list[tuple[float, str]]:
        self._stop.set()
        for thread in self._threads:
            thread.join()
        return self.done


def test_end_all_while_the_user_logs_in_elsewhere(store: RedisStore) -> None:
    """Three threads log the user in without pause while "end all" runs: every session whose login
    was done when it began is ended, round after round."""
    users = SessionMiddleware(lambda environ, start_response: [], store, secret=SECRET).users
    user = user_id()
    for _ in range(4):
        before = [bound(store, user) for _ in range(5)]
        logins = Logins(store, user, 3)
        time.sleep(0.05)
        began = time.monotonic()
        ended = users.end_all(user)
        done = logins.stop()
        existed = before + [key for finished, key in done if finished < began]
        assert len(done) > 3 and ended >= len(existed)
        assert [key for key in existed if store.load(key) is not None] == []
    users.end_all(user)


def test_listings_racing_logins_drop_none_from_the_index(store: RedisStore) -> None:
    """A listing tidies the index of sessions it finds gone: never of one a login is still making."""
    user = user_id()
    logins = Logins(store, user, 4)
    deadline = time.monotonic() + 1

    def list_sessions() -> None:
        while time.monotonic() < deadline:
            store.user_sessions(user)

    listings = [threading.Thread(target=list_sessions) for _ in range(3)]
    for thread in listings:
        thread.start()
    for thread in listings:
        thread.join()
    made = {key for _, key in logins.stop()}
    assert len(made) > 10 and keys_of(store, user) == made
    store.trim_user(user, 0)


# -- what the index costs (one server, counted at the wire) ------------------------------------


def devices_app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
    """POST /login (user), POST /set (k, v), GET /whoami, GET /devices, POST /others (end all but this one)."""
    session: Session = environ["session"]
    users = environ["test.users"]
    form = {k: v[0] for k, v in parse_qs(environ["wsgi.input"].read().decode()).items()}
    route = environ["PATH_INFO"]
    body: Any = None
    if route == "/login":
        session.login(form["user"])
    elif route == "/set":
        session[form["k"]] = form["v"]
    elif route == "/whoami":
        body = session.user_id
    elif route == "/devices":
        body = len(users.list(session.user_id, current=session))
    elif route == "/others":
        body = users.end_all(session.user_id, keep=session)
    data = json.dumps(body).encode()
    start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(data)))])
    return [data]


def middleware(store: SessionStore) -> SessionMiddleware:
    """The devices app on ``store``: each request sees ``mw.users`` as ``test.users``."""

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        environ["test.users"] = mw.users
        return devices_app(environ, start_response)

    mw = SessionMiddleware(app, store, secret=SECRET)
    return mw


def trips(wire: Wire, action: Callable[[], object]) -> list[str]:
    """The round trips ``action`` took, by the commands each carried."""
    wire.trips.clear()
    action()
    return list(wire.trips)


@each_redis_kind
def test_round_trips_of_a_users_sessions(private_redis: RedisServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """Logging in costs what any new session costs (the index is kept by the create script); the
    limit, one more; a logged-in read, one; listing, one script; ending N others, two, whatever N."""
    wire = Wire()
    store = RedisStore(client=counting_redis(private_redis.url, wire), prefix="rt:")
    mw = middleware(store)
    warm = Browser(mw)  # connections open, scripts loaded
    warm.request("POST", "/login", {"user": "warm"})
    warm.request("GET", "/devices")

    anonymous, phone = Browser(mw), Browser(mw)
    assert trips(wire, lambda: anonymous.request("POST", "/set", {"k": "a", "v": "1"})) == ["EVALSHA"]
    assert trips(wire, lambda: phone.request("POST", "/login", {"user": "ann"})) == ["EVALSHA"]
    assert trips(wire, lambda: phone.request("GET", "/whoami")) == ["HGETALL"]
    assert trips(wire, lambda: anonymous.request("POST", "/login", {"user": "ann"})) == ["HGETALL", "DEL", "EVALSHA"]

    laptops = [Browser(mw) for _ in range(5)]
    for laptop in laptops:
        laptop.request("POST", "/login", {"user": "ann"})
    assert trips(wire, lambda: phone.request("GET", "/devices")) == ["HGETALL", "EVALSHA"]
    assert json.loads(phone.request("GET", "/devices").body) == 7
    assert trips(wire, lambda: phone.request("POST", "/others")) == ["HGETALL", "EVALSHA", "UNLINK"]
    assert json.loads(phone.request("GET", "/devices").body) == 1
    assert [json.loads(browser.request("GET", "/whoami").body) for browser in [anonymous, *laptops]] == [None] * 6

    monkeypatch.setenv("SESSION_MAX_PER_USER", "3")
    limited = middleware(store)
    devices = [Browser(limited) for _ in range(4)]
    for device in devices[:3]:
        device.request("POST", "/login", {"user": "bob"})
        time.sleep(0.002)  # expiries a millisecond apart at least: the first is the least recently used
    assert trips(wire, lambda: devices[3].request("POST", "/login", {"user": "bob"})) == ["EVALSHA", "EVALSHA"]
    assert json.loads(devices[3].request("GET", "/devices").body) == 3
    assert json.loads(devices[0].request("GET", "/whoami").body) is None  # the least recently used
    store.close()


def cluster_client(setup: ClusterSetup, wire: Wire) -> RedisCluster:
    """A cluster client whose connections report each packet of commands they send to ``wire``."""

    class Counting(redis.Connection):
        def send_packed_command(self, command: Any, check_health: bool = True) -> None:
            wire.trip(" ".join(_resp_commands(command)))
            super().send_packed_command(command, check_health)

    nodes = [ClusterNode("127.0.0.1", node.port) for node in setup.nodes]  # type: ignore[no-untyped-call]
    return RedisCluster(startup_nodes=nodes, connection_class=Counting)


def test_round_trips_on_a_cluster(cluster: ClusterSetup) -> None:
    """On a cluster the index is another slot's: a login or a refresh writes it first (one more
    round trip); other writes do not, until the session ran LAG past its score; listing reads the
    index, then the sessions in one pipeline (a packet to each node that holds some, in parallel)."""
    wire = Wire()
    store = RedisStore(client=cluster_client(cluster, wire), prefix=unique("rt") + ":")
    user = user_id()
    for _ in range(30):  # every node has a connection open, and the scripts
        store.update(bound(store, user), Changes({"a": "1"}), 600)
    store.user_sessions(user)

    key = secrets.token_hex(32)
    assert trips(wire, lambda: store.create(key, {USER_KEY: binding(user)}, 600)) == ["EVALSHA", "EVALSHA"]
    assert trips(wire, lambda: store.create(secrets.token_hex(32), {"a": "1"}, 600)) == ["EVALSHA"]
    assert trips(wire, lambda: store.load(key)) == ["HGETALL"]
    assert trips(wire, lambda: store.update(key, Changes({"cart": "[1]"}), 600)) == ["EVALSHA"]
    assert trips(wire, lambda: store.update(key, Changes({USER_KEY: binding(user)}), 600)) == ["EVALSHA", "EVALSHA"]
    assert trips(wire, lambda: store.update(key, Changes({}), 600 + 2 * LAG / 1000)) == ["EVALSHA", "EVALSHA"]
    listing = trips(wire, lambda: store.user_sessions(user))
    assert listing[0] == "ZREMRANGEBYSCORE ZRANGE"
    assert 1 <= len(listing[1:]) <= len(cluster.nodes)  # in parallel: one round trip of latency
    assert all(set(packet.split()) == {"HMGET"} for packet in listing[1:])
    assert len(store.user_sessions(user)) == 31
    store.trim_user(user, 0)
    assert store.user_sessions(user) == []
    store.close()


# -- the index expires and shrinks by itself (one server) ---------------------------------------


def commands(server: RedisServer) -> dict[str, int]:
    """INFO commandstats: calls per command since the server started (scripts' commands included)."""
    client = redis.Redis.from_url(server.url)
    try:
        return {
            name.removeprefix("cmdstat_"): int(stats["calls"]) for name, stats in client.info("commandstats").items()
        }
    finally:
        client.close()


@each_redis_kind
def test_the_index_expires_with_the_users_last_session(private_redis: RedisServer) -> None:
    """A user who never returns leaves nothing behind: the index expires by its own TTL, with the
    user's last session, and nothing but time runs (no command from the store, no scan)."""
    store = RedisStore(private_redis.url, prefix="ix:")
    raw = redis.Redis.from_url(private_redis.url)
    user = user_id()
    for ttl in (0.3, 0.5, 0.4):
        bound(store, user, ttl=ttl)
    index = f"ix:{INDEX}{user}"
    assert raw.zcard(index) == 3
    assert 300 < raw.pttl(index) <= 500  # the latest session's expiry
    before = commands(private_redis)
    deadline = time.monotonic() + 5
    while raw.dbsize() and time.monotonic() < deadline:  # DBSIZE counts expired keys until Redis drops them
        time.sleep(0.05)
    assert raw.dbsize() == 0
    after = commands(private_redis)
    ran = {name for name, calls in after.items() if calls != before.get(name, 0)}
    assert ran <= {"info", "dbsize", "hello", "client|setinfo"}  # this test's own look, nothing else
    assert not {"scan", "keys"} & after.keys()
    raw.close()
    store.close()


@each_redis_kind
def test_the_index_shrinks_without_a_scan(private_redis: RedisServer) -> None:
    """Members of sessions expired or logged out stay in the index (the slack) until the user's next
    login or listing, each no longer than its session would have lived."""
    store = RedisStore(private_redis.url, prefix="ix:")
    raw = redis.Redis.from_url(private_redis.url)
    user = user_id()
    index = f"ix:{INDEX}{user}"
    short = [bound(store, user, ttl=0.3) for _ in range(3)]
    live = [bound(store, user) for _ in range(4)]
    for key in live[:2]:
        store.delete(key)  # logouts leave the index as it is
    time.sleep(0.5)
    assert raw.zcard(index) == 7  # 3 expired + 2 logged out + 2 live
    assert all(raw.exists(f"ix:{key}") == 0 for key in short)
    newest = bound(store, user)  # a login drops them all
    assert set(raw.zrange(index, 0, -1)) == {k.encode() for k in [*live[2:], newest]}
    store.delete(newest)
    assert raw.zcard(index) == 3
    assert keys_of(store, user) == set(live[2:])  # a listing drops the logged out
    assert raw.zcard(index) == 2
    assert not {"scan", "keys"} & commands(private_redis).keys()
    raw.close()
    store.close()


@each_redis_kind
def test_an_unbound_session_leaves_the_index(private_redis: RedisServer) -> None:
    """A binding removed, or the session bound to another user, leaves the index at once (one server)."""
    store = RedisStore(private_redis.url, prefix="ix:")
    raw = redis.Redis.from_url(private_redis.url)
    ann, bob = user_id(), user_id()
    first, second = bound(store, ann), bound(store, ann)
    assert store.update(first, Changes({}, (USER_KEY,)), 600)
    assert store.update(second, Changes({USER_KEY: binding(bob)}), 600)
    assert raw.exists(f"ix:{INDEX}{ann}") == 0
    assert raw.zrange(f"ix:{INDEX}{bob}", 0, -1) == [second.encode()]
    raw.close()
    store.close()


# -- the express format --------------------------------------------------------------------------


def test_the_express_format_binds_but_cannot_list(redis_url: str) -> None:
    """connect-redis's records keep the binding (the Express side reads it), but no index: the
    Express application writes sessions without one. Listing and limiting say so."""
    store = ConnectRedisStore(redis_url, document=ExpressDocument(3600), prefix=unique("express") + ":")
    user = user_id()
    key = bound(store, user)
    record = store.load(key)
    assert record is not None and record.data[USER_KEY]["id"] == user
    raw = redis.Redis.from_url(redis_url)
    assert json.loads(raw.get(store.prefix + key))[USER_KEY]["id"] == user  # type: ignore[arg-type]
    assert raw.exists(f"{store.prefix}{INDEX}{user}") == 0
    raw.close()
    with pytest.raises(NotImplementedError, match="express format"):
        store.user_sessions(user)
    with pytest.raises(NotImplementedError, match="express format"):
        store.trim_user(user, 1)
    store.delete_many([key])
    assert store.load(key) is None
    store.close()
