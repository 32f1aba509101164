"""FailoverStore on Redis topologies that fail in ways one server does not: a Sentinel failover to a
replica that missed acknowledged writes, a cluster node that freezes (a gray failure: its connections
stay open and nothing answers), and a Sentinel master that answers everything, late.

Real servers only (redis_topologies.py starts them on free loopback ports), a private table on the
shared PostgreSQL, and users clicking through SessionMiddleware and test_failover.py's demo app.
A frozen server is SIGSTOPped, and always SIGCONTinued before the test ends. Every test runs on
Redis with psycopg2, and on Valkey with psycopg 3 (servers.PAIRS); the one without PostgreSQL, on both.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import pytest
from redis_topologies import ClusterSetup, RedisProcess, SentinelSetup, command
from servers import SECRET, drop_table, each_pair, each_redis_kind, require_postgres, unique
from test_failover import BACK_LINE, CHANGED_LINE, DOWN_LINE, PROBE, SLOW_LINE, TIMEOUT, Browser, Log, demo

from wsgisession import SessionMiddleware
from wsgisession.stores.base import StoreError
from wsgisession.stores.failover import FailoverStore
from wsgisession.stores.health import State
from wsgisession.stores.postgres import PostgresStore
from wsgisession.stores.redis import RedisStore

pytestmark = pytest.mark.slow

BUDGET = 0.1  # FailoverStore's latency budget, s
WAIT = 20.0  # the longest any wait in these tests may take before the test fails, s


# -- fixtures and helpers -------------------------------------------------------------------------


@pytest.fixture
def pg_table() -> Iterator[tuple[str, str]]:
    """The shared PostgreSQL's URL and a table name of this test's own (dropped after it)."""
    url, table = require_postgres(), unique("topo")
    yield url, table
    drop_table(url, table)


@pytest.fixture
def log(caplog: pytest.LogCaptureFixture) -> Log:
    """The wsgisession log lines of the test, from INFO up."""
    caplog.set_level(logging.INFO, logger="wsgisession")
    return Log(caplog)


@pytest.fixture
def sentinel(redis_kind: str) -> Iterator[SentinelSetup]:
    """A master, a replica and three Sentinels of this test's own (the test kills the master)."""
    setup = SentinelSetup(kind=redis_kind).start()
    yield setup
    setup.close()


@pytest.fixture
def cluster(redis_kind: str) -> Iterator[ClusterSetup]:
    """Three masters of this test's own (the test freezes one)."""
    setup = ClusterSetup(kind=redis_kind).start()
    yield setup
    setup.close()


@pytest.fixture
def failover(pg_table: tuple[str, str], pg_driver: str) -> Iterator[Callable[..., FailoverStore]]:
    """Build FailoverStores on a Redis URL and the test's table, as test_failover.py's Backends do; closed after."""
    made: list[FailoverStore] = []

    def build(redis_url: str, timeout: float = TIMEOUT) -> FailoverStore:
        cache = RedisStore(redis_url, prefix=unique("topo") + ":", timeout=timeout)
        durable = PostgresStore(pg_table[0], table=pg_table[1], cleanup_interval=0, timeout=1.0, driver=pg_driver)
        made.append(FailoverStore(cache, durable, probe_interval=PROBE, latency_budget=BUDGET))
        return made[-1]

    yield build
    for store in made:
        store.close()


def app_of(store: FailoverStore) -> SessionMiddleware:
    """The demo app on ``store``."""
    return SessionMiddleware(demo, store, secret=SECRET)


@contextlib.contextmanager
def frozen(server: RedisProcess) -> Iterator[None]:
    """SIGSTOP ``server`` for the block, SIGCONT after: its sockets stay open and nothing answers."""
    assert server.process is not None
    pid = server.process.pid
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def click(browser: Browser, times: int) -> None:
    """``times`` acknowledged increments (303 each)."""
    for _ in range(times):
        assert browser.counter().status == 303


def bounded(seconds: float, rounds: int = 10_000) -> Iterator[int]:
    """Loop rounds until ``seconds`` pass (or ``rounds`` are done)."""
    deadline = time.monotonic() + seconds
    for n in range(rounds):
        if time.monotonic() >= deadline:
            return
        yield n


def poll(condition: Callable[[], Any], what: str, timeout: float = WAIT) -> Any:
    """Poll ``condition`` until it returns something true (returned), or fail the test saying ``what``."""
    for _ in bounded(timeout):
        found = condition()
        if found:
            return found
        time.sleep(0.02)
    pytest.fail(f"{what}: not within {timeout} s")


def redis_key(store: FailoverStore | RedisStore, key: str) -> str:
    """The Redis key of the session ``key`` in ``store`` (its Redis store's prefix, then the key)."""
    cache = store.cache if isinstance(store, FailoverStore) else store
    assert isinstance(cache, RedisStore)
    return cache.prefix + key


def stored_count(server: RedisProcess, store: FailoverStore | RedisStore, key: str) -> int | None:
    """The count in ``server``'s own copy of the session ``key`` (None without one), read without the store."""
    client = server.client()
    try:
        value = client.hget(redis_key(store, key), "count")
    finally:
        client.close()
    return None if value is None else int(value)


# -- Sentinel: a failover to a replica that missed acknowledged writes ------------------------------


def cut_replication(master: RedisProcess) -> None:
    """Drop the master's link to its replica (as a partition or an output buffer overflow would): the
    writes that follow reach the master alone. A frozen replica does not reconnect before it is thawed."""
    client = master.client()
    try:
        assert command(client, "CLIENT", "KILL", "TYPE", "replica") == 1
    finally:
        client.close()


def fail_over_losing(setup: SentinelSetup, writes: Callable[[], None]) -> int:
    """Freeze the replica, cut its link, run ``writes`` (acknowledged by the master alone), SIGKILL the
    master and thaw the replica, which the Sentinels then promote; return the old master's port."""
    old_port = setup.master_port()
    with frozen(setup.replica):
        cut_replication(setup.master)
        writes()
        setup.kill_master()
    return old_port


def new_master_answers(setup: SentinelSetup, old_port: int) -> bool:
    """Whether the Sentinels name another master, and it says it is one."""
    port = setup.master_port()
    return port != old_port and setup.server(port).info("replication").get("role") == "master"


class Read(NamedTuple):
    """One read of the session: when (time.monotonic()), what, and which store served reads then."""

    at: float  # time.monotonic()
    session: dict[str, Any]
    serving: str


def read_through_failover(browser: Browser, store: FailoverStore, setup: SentinelSetup,
                          old_port: int) -> tuple[list[Read], float]:  # fmt: skip
    """Read the session over and over until the new master answers, the store serves from Redis again,
    and one more second passed; return the reads and when the new master first answered."""
    reads: list[Read] = []
    answered: float | None = None
    for _ in bounded(WAIT + 5):
        reads.append(Read(time.monotonic(), browser.session(), store.serving_from))
        if answered is None and new_master_answers(setup, old_port):
            answered = time.monotonic()
        if answered is not None and store.serving_from == "Redis" and time.monotonic() > answered + 2 * PROBE + 1:
            return reads, answered
        time.sleep(0.01)
    pytest.fail(f"no failover and return to Redis within {WAIT + 5} s (new master answered: {answered})")


@each_redis_kind
def test_promoted_replica_really_misses_the_latest_writes(sentinel: SentinelSetup, stores: list[Any]) -> None:
    """The scenario below is real: a Redis store alone, following the Sentinels, reads the older copy."""
    cache = RedisStore(sentinel.url(), prefix=unique("topo") + ":", timeout=TIMEOUT)
    stores.append(cache)
    cache.create("alice", {"count": "3"}, 600)
    poll(lambda: stored_count(sentinel.replica, cache, "alice") == 3, "the replica got count 3")
    old_port = fail_over_losing(sentinel, lambda: cache.create("alice", {"count": "7"}, 600))
    assert sentinel.wait_for_failover(old_port) is sentinel.replica
    record = poll(lambda: _load_or_none(cache, "alice"), "the store reads the new master")
    assert record.data == {"count": 3}, "the promoted replica had the latest write: the scenario proves nothing"


def _load_or_none(cache: RedisStore, key: str) -> Any:
    """``cache.load(key)``, or None while it fails (the Sentinels may still name the dead master)."""
    try:
        return cache.load(key)
    except StoreError:
        return None


@each_pair
def test_sentinel_failover_to_a_lagging_replica_serves_no_older_copy(
    sentinel: SentinelSetup, failover: Callable[..., FailoverStore], log: Log
) -> None:
    """Alice's last clicks reach the master alone, which dies; the Sentinels promote the replica, which
    has her older count. Two probe intervals after the new master answers, she never reads that again."""
    store = failover(sentinel.url())
    alice = Browser(app_of(store))
    alice.login("alice")
    click(alice, 3)
    poll(lambda: stored_count(sentinel.replica, store, alice.key) == 3, "the replica got count 3")
    time.sleep(2 * PROBE)  # the probe has seen the master's server id
    old_port = fail_over_losing(sentinel, lambda: click(alice, 4))  # acknowledged: 7, in the master alone
    assert stored_count(sentinel.replica, store, alice.key) == 3, "the replica, about to be promoted, is not behind"

    reads, answered = read_through_failover(alice, store, sentinel, old_port)
    assert sentinel.wait_for_failover(old_port) is sentinel.replica
    assert {r.session["user"] for r in reads} == {"alice"}, "alice was logged out during the failover"
    late = [(round(r.at - answered, 3), r.session["count"], r.serving) for r in reads
            if r.session["count"] != 7 and r.at >= answered + 2 * PROBE]  # fmt: skip
    assert late == [], f"older counts read after the new master answered (s after, count, store): {late}"
    assert log(CHANGED_LINE) == 1
    assert alice.session() == {"user": "alice", "count": 7}
    assert store.serving_from == "Redis"
    assert store.durable.count_stale() == 0
    assert stored_count(sentinel.replica, store, alice.key) == 7, "the new master's copy is not the latest"
    click(alice, 1)
    assert alice.session() == {"user": "alice", "count": 8}
    assert stored_count(sentinel.replica, store, alice.key) == 8


# -- Cluster: a frozen node -------------------------------------------------------------------------


class User:
    """A browser and the count its user made."""

    def __init__(self, app: SessionMiddleware, name: str) -> None:
        self.browser = Browser(app)
        self.name = name
        self.count = 0
        self.browser.login(name)

    def check(self) -> bool:
        """Whether the session reads back as this user with every click counted."""
        return self.browser.session() == {"user": self.name, "count": self.count}

    def click(self) -> None:
        """One acknowledged increment."""
        click(self.browser, 1)
        self.count += 1


def users_on_every_node(app: SessionMiddleware, setup: ClusterSetup, store: FailoverStore) -> list[User]:
    """Log users in until every node holds at least two of their sessions (at most 60 users)."""
    users: list[User] = []
    holders: dict[int, int] = {node.port: 0 for node in setup.nodes}
    while min(holders.values()) < 2 and len(users) < 60:
        user = User(app, f"user{len(users)}")
        holders[setup.node_of(redis_key(store, user.browser.key)).port] += 1
        users.append(user)
    assert min(holders.values()) >= 2, f"sessions per node after 60 users: {holders}"
    return users


class Timed(NamedTuple):
    """How long one request took, whose, and which."""

    seconds: float
    user: str
    what: str


def timed(user: User, what: str, action: Callable[[], Any]) -> tuple[Timed, Any]:
    """Run ``action`` (a request of ``user``); return how long it took, and what it returned."""
    started = time.monotonic()
    result = action()
    return Timed(time.monotonic() - started, user.name, what), result


@each_pair
def test_frozen_cluster_node_falls_back_to_postgres_and_comes_back(
    cluster: ClusterSetup, failover: Callable[..., FailoverStore], log: Log
) -> None:
    """One node of three freezes under users clicking: within about a timeout every read goes to
    PostgreSQL, no request fails, every count is right; once it thaws, Redis serves again."""
    store = failover(cluster.url())
    users = users_on_every_node(app_of(store), cluster, store)
    for user in users:
        user.click()
    victim = cluster.node_of(redis_key(store, users[0].browser.key))
    on_victim = {u.name for u in users if cluster.node_of(redis_key(store, u.browser.key)) is victim}
    time.sleep(2 * PROBE)  # the probe has seen every primary
    timings: list[Timed] = []
    wrong: list[str] = []
    with frozen(victim):
        froze = time.monotonic()
        down_after = None
        for n in bounded(2.5):
            user = users[n % len(users)]
            took, right = timed(user, "read", user.check)
            timings += [took, timed(user, "click", user.click)[0]]
            if not right:
                wrong.append(user.name)
            if down_after is None and store.serving_from == "PostgreSQL":
                down_after = time.monotonic() - froze
        assert users[0].check(), "the user on the frozen node does not read her count"
        users[0].click()
        assert store.serving_from == "PostgreSQL"
    thawed = time.monotonic()
    for n in bounded(WAIT):
        if store.serving_from == "Redis":
            break
        user = users[n % len(users)]
        if not user.check():
            wrong.append(user.name)
        user.click()
    back_after = time.monotonic() - thawed

    slow = [t for t in timings if t.seconds >= TIMEOUT]
    assert wrong == [], f"wrong counts read (users on the frozen node: {sorted(on_victim)})"
    assert down_after is not None and down_after <= 3 * TIMEOUT + PROBE, f"marked down after {down_after} s"
    assert len(slow) <= 3, f"{len(slow)} requests waited a timeout or more: {slow}"
    assert store.serving_from == "Redis", f"still serving from PostgreSQL {WAIT} s after the node thawed"
    assert back_after < 5, f"back to Redis only {back_after:.1f} s after the node thawed"
    assert all(user.check() for user in users), "a count is wrong once Redis serves again"
    for user in users:  # served from Redis: each copy there is the latest
        record = store.cache.load(user.browser.key)
        assert record is not None and record.data == {"user": user.name, "count": user.count}, user.name
    assert (log(DOWN_LINE), log(BACK_LINE), log(CHANGED_LINE)) == (1, 1, 0)
    assert store.durable.count_stale() == 0


# -- Sentinel: a slow master --------------------------------------------------------------------------

# Keep the server busy for ARGV[1] microseconds: every other command waits meanwhile. Valkey freezes TIME
# for the length of a script (the loop would never end), so there it counts os.clock(), the CPU time the
# loop spends; Redis 7.0 has no os library (the pcall fails), and its TIME moves.
BUSY = """
local has_clock, clock = pcall(function() return os.clock end)
local function now()
  if has_clock then return clock() * 1000000 end
  local t = redis.call('TIME')
  return t[1] * 1000000 + t[2]
end
local began = now()
repeat until now() - began >= tonumber(ARGV[1])
return 1
"""
BUSY_SECONDS = 0.25  # well above the budget, and far below the slow test's timeout and down-after


@pytest.fixture
def patient_sentinel(redis_kind: str) -> Iterator[SentinelSetup]:
    """Sentinels that call a master down after 2 s without an answer: a slow master is not a dead one."""
    setup = SentinelSetup(down_after_ms=2000, kind=redis_kind).start()
    yield setup
    setup.close()


@contextlib.contextmanager
def slowed(server: RedisProcess) -> Iterator[None]:
    """For the block, a thread keeps ``server`` busy BUSY_SECONDS at a time, back to back: a command
    waits for the run in progress (a command sent just after the last one answered, the whole run)."""
    stop = threading.Event()

    def hog() -> None:
        client = server.client(timeout=5)
        try:
            for _ in bounded(WAIT * 2):
                if stop.is_set():
                    return
                client.eval(BUSY, 0, round(BUSY_SECONDS * 1e6))
        finally:
            client.close()

    thread = threading.Thread(target=hog, name="busy-redis", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(WAIT)


class States:
    """The cache's state in one store as a request loop sees it: (state, since) at each change."""

    def __init__(self, store: FailoverStore) -> None:
        self.health = store.cache_health
        self.seen: list[tuple[State, float]] = []
        self.poll()

    def poll(self) -> None:
        since, state = self.health.since, self.health.state
        if since == self.health.since and (not self.seen or self.seen[-1] != (state, since)):
            self.seen.append((state, since))

    def down_periods(self) -> list[float | None]:
        """How long each period down lasted (None when a later switch down came before the poll saw it end)."""
        periods: list[float | None] = []
        for (state, since), (after, until) in zip(self.seen, self.seen[1:], strict=False):
            if state is State.DOWN:
                periods.append(None if after is State.DOWN else until - since)
        return periods


def hold(flaps: int) -> float:
    """How long Redis must answer within the budget before it is used again, after ``flaps`` quick relapses."""
    return PROBE * min((1 << flaps) - 1, 32)


@each_pair
def test_slow_sentinel_master_is_left_for_postgres_with_a_growing_hold(
    patient_sentinel: SentinelSetup, failover: Callable[..., FailoverStore], log: Log
) -> None:
    """The master answers every command, up to 250 ms late (never a timeout: 1 s here), for 3 s. The store
    leaves it for PostgreSQL within a few requests; a probe that happens to answer fast may bring it back,
    but each relapse soon after makes the next return wait longer. No request fails, no count is wrong,
    the Sentinels see no failure, and once the master is fast again Redis serves and stays."""
    setup = patient_sentinel
    store = failover(setup.url(), timeout=1.0)
    alice = User(app_of(store), "alice")
    for _ in range(3):
        alice.click()
    time.sleep(2 * PROBE)
    master = setup.server(setup.master_port())
    states = States(store)
    before: list[Timed] = []  # requests while the store still used the slow Redis, before it first left
    with slowed(master):
        for _ in bounded(3.0):
            took, right = timed(alice, "read", alice.check)
            assert right, "alice read a wrong count while Redis was slow"
            if not log(SLOW_LINE):
                before += [took, timed(alice, "click", alice.click)[0]]
            else:
                alice.click()
            states.poll()
    back_after = back_to_redis(store, alice, states)
    for _ in bounded(1.0):  # and it stays
        assert alice.check()
        alice.click()
        states.poll()

    assert log(SLOW_LINE) >= 1 and len(before) <= 16, f"{len(before)} requests before Redis was left: {before}"
    assert (log(DOWN_LINE), log(CHANGED_LINE)) == (0, 0), "a slow server is neither down nor another server"
    periods = states.down_periods()
    too_soon = [(n, round(p, 3)) for n, p in enumerate(periods) if p is not None and p < hold(n) - 0.01]
    assert too_soon == [], f"back from down before the hold (relapse, seconds down): {too_soon}; all: {periods}"
    assert back_after < hold(len(periods) - 1) + 2, f"back to Redis {back_after:.2f} s after it was fast again"
    assert states.seen[-1][0] is State.UP
    assert setup.master_port() == master.port, "the Sentinels failed the slow master over"
    assert store.serving_from == "Redis" and alice.check()
    assert stored_count(master, store, alice.browser.key) == alice.count
    assert store.durable.count_stale() == 0


def back_to_redis(store: FailoverStore, alice: User, states: States) -> float:
    """Click on until the store serves from Redis again; return how long that took."""
    started = time.monotonic()
    for _ in bounded(WAIT):
        states.poll()
        if store.serving_from == "Redis":
            return time.monotonic() - started
        assert alice.check(), "alice read a wrong count on the way back to Redis"
        alice.click()
        time.sleep(0.01)
    pytest.fail(f"still serving from PostgreSQL {WAIT} s after Redis was fast again")
