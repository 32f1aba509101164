"""What a user's sessions cost, per store: a logged-in read, a login, listing a user's sessions, ending them.

Run it from the repository root, with Redis and PostgreSQL on loopback (about 80 seconds)::

    .venv/bin/python benchmarks/users.py [--rounds 31] [--batch-ms 30] [--others 10000] [--stores redis,sqlite] [--rst]

REDIS_URL and DATABASE_URL (default: redis://127.0.0.1:6379/0 and postgresql://postgres@127.0.0.1:5432/test)
must point at 127.0.0.1 or localhost. Each store (Redis, PostgreSQL, SQLite, Redis+PostgreSQL as a
FailoverStore) has a key prefix or table of this run alone, removed afterwards, and holds from the start
``--others`` sessions of as many other users (the logins below add theirs); PostgreSQL's tables are then
ANALYZEd, as autovacuum does a table in use (without statistics, PostgreSQL looks a user's sessions up
through the expiry index as well: a scan of every live session). In-process, per store:

- ``read``: a request through SessionMiddleware that reads ``session["user_id"]``, of a session bound to
  a user by ``session.login()`` and of an unbound one with the same data (the baseline);
- ``new session``: a request without a cookie that sets that data (the baseline); ``login``: the same
  after ``session.login(user)``, each by a user with no other session, with SESSION_MAX_PER_USER off and
  at 5; ``login, at the limit``: at 5, by users who have 5 sessions already, so that it ends one;
- ``list``: ``middleware.users.list(user)`` of a user with 3, and with 100, sessions;
- ``end all``: ``middleware.users.end_all(user)`` of a user with 3, and with 100, sessions (made before
  each batch, outside the timing; the figure is per call, not per session).

Each round times a batch of every item (about ``--batch-ms`` long; an ``end all`` batch ends at most 300
sessions), in a shuffled order; ``µs`` is the median over the rounds of an item's mean per operation,
``±%`` the interquartile range over the rounds, ``x`` the median of the rounds' ratios to the baseline
(the unbound read, the new session; for 100 sessions, 3), ``+µs`` the difference of the medians.

``round trips``: what the store's connections sent per operation, counted in them (a Redis command or
pipeline, a PostgreSQL statement: autocommit, so one round trip each; for SQLite, in-process, statements),
the cleanup and probe threads' left out; for Redis+PostgreSQL ``R`` and ``P`` are each one's.
``Redis cmds``: the commands Redis ran per operation, by INFO commandstats (those scripts run included;
INFO and PING left out), the least of five passes, since other clients of the server add theirs.
``--rst`` adds the README's table: µs, the ratio to the baseline, round trips (``RT``; Redis+PostgreSQL:
Redis's + PostgreSQL's).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import itertools
import json
import os
import random
import secrets
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import psycopg2
import psycopg2.extensions
import redis
from bench import DATABASE_URL, REDIS_URL, RUN, Timing, batch, call, paired, summary
from common import close_all, drop_run_tables, loopback_only, print_table, remove_from_redis, rst_table, run_keys
from werkzeug.test import create_environ

from wsgisession import SessionMiddleware
from wsgisession.stores.base import USER_KEY, SessionStore
from wsgisession.stores.failover import FailoverStore
from wsgisession.stores.postgres import PostgresStore
from wsgisession.stores.redis import RedisStore
from wsgisession.stores.sqlite import SQLiteStore

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIEnvironment

STORES = {"redis": "Redis", "postgres": "PostgreSQL", "sqlite": "SQLite", "failover": "Redis+PostgreSQL"}
DATA = {"user_id": 42, "counter": 0}  # what every session of the reads and logins holds
TTL = 86400.0
LIMIT = 5  # SESSION_MAX_PER_USER, when on
POOL = 50  # users who log in at the limit, in turn
MOST_ENDED = 300  # sessions an "end all" batch ends at most (they are made before it)
COUNT_CALLS = 20  # operations per counting pass, at most
COUNT_PASSES = 5  # the least is reported


# -- counting round trips ----------------------------------------------------------------


class Meter:
    """Round trips per backend, counted by the connections while a timed section runs in the main thread;
    with ``server`` on, Redis's own count of the commands it ran in the same sections."""

    def __init__(self) -> None:
        self.thread = threading.get_ident()
        self.active = False
        self.trips: dict[str, int] = {}
        self.server: redis.Redis | None = None  # counts Redis's commands too, when set
        self.commands = 0

    def add(self, backend: str) -> None:
        if self.active and threading.get_ident() == self.thread:
            self.trips[backend] = self.trips.get(backend, 0) + 1

    def reset(self) -> None:
        self.trips, self.commands = {}, 0

    @contextlib.contextmanager
    def on(self) -> Iterator[None]:
        before = self._commands() if self.server else 0
        self.active = True
        try:
            yield
        finally:
            self.active = False
            if self.server:
                self.commands += self._commands() - before

    def _commands(self) -> int:
        assert self.server is not None
        stats = self.server.info("commandstats")
        return sum(int(s["calls"]) for name, s in stats.items() if name not in ("cmdstat_info", "cmdstat_ping"))


METER = Meter()


class CountingConnection(redis.connection.Connection):
    """A Redis connection that counts what it sends: a command, or a whole pipeline, is one round trip."""

    def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        METER.add("redis")
        super().send_packed_command(command, check_health)  # type: ignore[no-untyped-call]


class CountingCursor(psycopg2.extensions.cursor):  # type: ignore[misc]
    """A psycopg2 cursor that counts its statements (the store's connections autocommit: one round trip each)."""

    def execute(self, query: Any, vars: Any = None) -> Any:
        METER.add("postgres")
        return super().execute(query, vars)


class CountedPostgres(PostgresStore):
    """PostgresStore whose connections count their statements."""

    def _connect(self) -> Any:
        conn = super()._connect()
        conn.cursor_factory = CountingCursor
        return conn


class CountedSQLite(SQLiteStore):
    """SQLiteStore whose connections count the statements SQLite runs."""

    def _connect(self) -> Any:
        conn = super()._connect()
        conn.set_trace_callback(lambda statement: METER.add("sqlite"))
        return conn


def counted_redis(prefix: str) -> RedisStore:
    """A RedisStore on REDIS_URL whose connections count what they send."""
    store = RedisStore(REDIS_URL, prefix=prefix)
    pool = store.client.connection_pool  # type: ignore[union-attr]
    if pool.connection_class is not redis.connection.Connection:
        sys.exit(f"REDIS_URL gives {pool.connection_class.__name__} connections: use redis://")
    pool.connection_class = CountingConnection  # before the first connection: none is made before a command
    return store


def name(what: str) -> str:
    """A table name or key prefix of this run only."""
    return f"bench_{RUN}_{what}"


TABLES = {"postgres": name("users"), "failover": name("users_fo")}  # PostgreSQL's, per store


def make_store(kind: str, workdir: str) -> SessionStore:
    if kind == "redis":
        return counted_redis(name("users") + ":")
    if kind == "postgres":
        return CountedPostgres(DATABASE_URL, table=TABLES[kind])
    if kind == "sqlite":
        return CountedSQLite(os.path.join(workdir, "users.sqlite3"), table=name("users"))
    return FailoverStore(counted_redis(name("users_fo") + ":"), CountedPostgres(DATABASE_URL, table=TABLES[kind]))


def analyze(table: str) -> None:
    """Give PostgreSQL's planner the statistics autovacuum would have gathered on a table in use: on a
    table without any, it plans a user's lookup with the expiry index too, a scan of every live session."""
    conn = psycopg2.connect(DATABASE_URL)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute(f"ANALYZE {table}")
    finally:
        conn.close()


# -- the application and the sessions ---------------------------------------------------------


class App:
    """What the middleware wraps: ``/read`` reads session["user_id"]; ``/plain`` sets DATA in a new
    session; ``/login/new`` logs a user with no other session in first, ``/login/pool`` the next of POOL."""

    def __init__(self, kind: str) -> None:
        self.fresh = (f"{kind}-new-{n}" for n in itertools.count())
        self.pool = itertools.cycle(pool_users(kind))
        self.last = ""  # the user of the latest login

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        session = environ["session"]
        path = environ["PATH_INFO"]
        if path == "/read":
            body = str(session.get("user_id")).encode()
        else:
            if path.startswith("/login/"):
                self.last = next(self.fresh if path == "/login/new" else self.pool)
                session.login(self.last)
            session.update(DATA)
            body = b"ok"
        start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
        return [body]


def pool_users(kind: str) -> list[str]:
    return [f"{kind}-pool-{n}" for n in range(POOL)]


def middleware(app: App, store: SessionStore, max_per_user: int) -> SessionMiddleware:
    """SessionMiddleware over ``store`` with SESSION_MAX_PER_USER at ``max_per_user`` (read from the environment)."""
    os.environ["SESSION_MAX_PER_USER"] = str(max_per_user)
    try:
        return SessionMiddleware(app, store, secret=os.environ["BENCH_SECRET"], max_age=TTL)
    finally:
        del os.environ["SESSION_MAX_PER_USER"]


def seed(store: SessionStore, user: str, sessions: int, seen: int) -> None:
    """Give ``user`` this many sessions, as a login writes them (last seen at ``seen``)."""
    binding = json.dumps({"id": user, "login": seen, "seen": seen})
    values = {USER_KEY: binding, **{k: json.dumps(v) for k, v in DATA.items()}}
    for _ in range(sessions):
        store.create(hashlib.sha256(secrets.token_bytes(16)).hexdigest(), values, TTL)


def cookie_of(mw: SessionMiddleware, path: str) -> str:
    """The ``name=value`` of the session a request to ``path`` starts."""
    status, cookies, _ = call(mw, path)
    if not (status.startswith("200") and cookies):
        raise RuntimeError(f"{path}: {status}, no cookie")
    return str(cookies[0].split(";", 1)[0])


def expect(what: str, got: object, wanted: object) -> None:
    if got != wanted:
        raise RuntimeError(f"{what}: {got!r}, not {wanted!r}")


# -- what is timed -----------------------------------------------------------------------


@dataclass
class Item:
    store: str
    label: str
    run: Callable[[int], float]  # n operations, timed: the mean seconds per operation
    base: str = ""  # the label of the item it is compared with
    most: int = 200_000  # operations in a batch
    calls: int = 0
    trips: dict[str, float] = field(default_factory=dict)
    commands: float | None = None
    seconds: list[float] = field(default_factory=list)  # per operation, in each round


def timed(operation: Callable[[], object], calls: int) -> float:
    with METER.on():
        started = time.perf_counter()
        for _ in range(calls):
            operation()
        return (time.perf_counter() - started) / calls


def requests(mw: SessionMiddleware, path: str, cookie: str | None = None) -> Callable[[int], float]:
    environ = create_environ(path, "http://127.0.0.1/", headers={"Cookie": cookie} if cookie else {})

    def run(calls: int) -> float:
        with METER.on():
            return batch(mw, environ, calls)[0]

    return run


def ending(mw: SessionMiddleware, kind: str, sessions: int) -> Callable[[int], float]:
    """End-all calls, each of a user given ``sessions`` sessions just before the batch."""
    numbers = itertools.count()

    def run(calls: int) -> float:
        users = [f"{kind}-end{sessions}-{next(numbers)}" for _ in range(calls)]
        for user in users:
            seed(mw.store, user, sessions, int(time.time()))
        pending, ended = iter(users), []
        seconds = timed(lambda: ended.append(mw.users.end_all(next(pending))), calls)
        expect(f"end_all of {sessions} sessions", set(ended), {sessions})
        return seconds

    return run


def prepare(kind: str, store: SessionStore, others: int) -> list[Item]:
    """The store's items, once it holds what they need and each does what it says."""
    label = STORES[kind]
    app = App(kind)
    off, on = middleware(app, store, 0), middleware(app, store, LIMIT)
    t = int(time.time())
    print(f"{label}: {others} other users' sessions...", file=sys.stderr, flush=True)
    for n in range(others):
        seed(store, f"{kind}-other-{n}", 1, t)
    for user in pool_users(kind):
        seed(store, user, LIMIT, t - 3600)
    for sessions in (3, 100):
        seed(store, f"{kind}-list{sessions}", sessions, t)
    if kind in TABLES:
        analyze(TABLES[kind])

    bound, unbound = cookie_of(off, "/login/new"), cookie_of(off, "/plain")
    expect("the login's user's sessions", len(off.users.list(app.last)), 1)
    for cookie in (bound, unbound):
        expect("a read", call(off, "/read", cookie)[2], b"42")
    cookie_of(on, "/login/pool")
    expect("a login at the limit leaves", len(on.users.list(app.last)), LIMIT)
    for sessions in (3, 100):
        expect(f"the list of {sessions}", len(off.users.list(f"{kind}-list{sessions}")), sessions)

    def listing(sessions: int) -> Callable[[int], float]:
        user = f"{kind}-list{sessions}"
        return lambda calls: timed(lambda: off.users.list(user), calls)

    return [
        Item(label, "read, unbound", requests(off, "/read", unbound)),
        Item(label, "read, bound", requests(off, "/read", bound), "read, unbound"),
        Item(label, "new session", requests(off, "/plain")),
        Item(label, "login", requests(off, "/login/new"), "new session"),
        Item(label, f"login, limit {LIMIT}", requests(on, "/login/new"), "new session"),
        Item(label, f"login, at the limit {LIMIT}", requests(on, "/login/pool"), "new session"),
        Item(label, "list, 3 sessions", listing(3)),
        Item(label, "list, 100 sessions", listing(100), "list, 3 sessions"),
        Item(label, "end all, 3 sessions", ending(off, kind, 3), most=MOST_ENDED // 3),
        Item(label, "end all, 100 sessions", ending(off, kind, 100), "end all, 3 sessions", MOST_ENDED // 100),
    ]


def size(item: Item, batch_s: float, min_calls: int) -> None:
    """Warm the item up, and size its batches."""
    item.run(min(20, item.most))
    per_call = item.run(min(50, item.most))
    item.calls = max(min(min_calls, item.most), min(item.most, int(batch_s / per_call)))


def count(item: Item, server: bool) -> None:
    """The item's round trips per operation (and Redis's commands): the least of COUNT_PASSES passes."""
    calls = min(COUNT_CALLS, item.most)
    passes = []
    for _ in range(COUNT_PASSES):
        METER.reset()
        item.run(calls)
        passes.append(({backend: n / calls for backend, n in METER.trips.items()}, METER.commands / calls))
    item.trips = min((trips for trips, _ in passes), key=lambda trips: sum(trips.values()))
    item.commands = min(commands for _, commands in passes) if server else None


def measure(items: list[Item], rounds: int) -> None:
    for r in range(rounds):
        order = items[:]
        random.Random(r).shuffle(order)
        print(f"  round {r + 1}/{rounds}", file=sys.stderr, flush=True)
        for item in order:
            item.seconds.append(item.run(item.calls))


# -- the report --------------------------------------------------------------------------


def timing(item: Item) -> Timing:
    return summary([s * 1e6 for s in item.seconds])


def number(value: float) -> str:
    return f"{value:.2f}".rstrip("0").rstrip(".")


def trips(item: Item) -> str:
    total = number(sum(item.trips.values()))
    if item.store != STORES["failover"]:
        return total
    return f"{total} (R {number(item.trips.get('redis', 0))}, P {number(item.trips.get('postgres', 0))})"


def report(items: list[Item]) -> list[list[str]]:
    by_label = {(item.store, item.label): item for item in items}
    rows = []
    for item in items:
        t = timing(item)
        base = by_label.get((item.store, item.base))
        bt = timing(base) if base else None
        rows.append([item.store, item.label, f"{t.us:.1f}", f"{t.spread:.0f}",
                     f"{paired(t, bt):.2f}" if bt else "", f"{t.us - bt.us:+.1f}" if bt else "", trips(item),
                     number(item.commands) if item.commands is not None else ""])  # fmt: skip
    return rows


def rst(items: list[Item]) -> str:
    """The README's table: per store, what a logged-in read, a login, a listing and an ending cost
    (µs, the ratio to the baseline, round trips: for Redis+PostgreSQL, Redis's + PostgreSQL's)."""
    by_key = {(item.store, item.label): item for item in items}

    def us(store: str, label: str) -> str:
        return f"{timing(by_key[store, label]).us:.0f}"

    def rt(store: str, label: str) -> str:
        item = by_key[store, label]
        if store != STORES["failover"]:
            return number(sum(item.trips.values()))
        return f"{number(item.trips.get('redis', 0))}+{number(item.trips.get('postgres', 0))}"

    def versus(store: str, label: str, base: str) -> str:
        ratio = paired(timing(by_key[store, label]), timing(by_key[store, base]))
        return f"{us(store, label)} µs ({ratio:.2f}x), {rt(store, label)} RT"

    def pair(store: str, what: str) -> str:
        labels = (f"{what}, 3 sessions", f"{what}, 100 sessions")
        trips = " / ".join(dict.fromkeys(rt(store, label) for label in labels))
        return f"{us(store, labels[0])} / {us(store, labels[1])} µs, {trips} RT"

    header = ["Store", "Logged-in read", "Login", f"Login past the limit ({LIMIT})", "List 3 / 100",
              "End all 3 / 100"]  # fmt: skip
    rows = [header]
    for store in dict.fromkeys(item.store for item in items):
        rows.append([store, versus(store, "read, bound", "read, unbound"), versus(store, "login", "new session"),
                     versus(store, f"login, at the limit {LIMIT}", "new session"), pair(store, "list"),
                     pair(store, "end all")])  # fmt: skip
    return rst_table(rows)


# -- main --------------------------------------------------------------------------------


def cleanup(stores: list[SessionStore], workdir: str) -> None:
    close_all((store.name, store.close) for store in stores)
    remove_from_redis(REDIS_URL, run_keys(REDIS_URL, RUN))
    drop_run_tables(DATABASE_URL, RUN)
    shutil.rmtree(workdir, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--rounds", type=int, default=31, help="rounds (the median is reported)")
    parser.add_argument("--batch-ms", type=float, default=30, help="length of one batch of an item")
    parser.add_argument("--min-calls", type=int, default=20, help="fewest operations in a batch")
    parser.add_argument("--others", type=int, default=10_000, help="other users' sessions in each store")
    parser.add_argument("--stores", default=",".join(STORES), help="comma-separated subset of: " + ", ".join(STORES))
    parser.add_argument("--rst", action="store_true", help="also print the README's table")
    args = parser.parse_args()
    loopback_only(REDIS_URL, DATABASE_URL)
    kinds = [k.strip() for k in args.stores.split(",")]
    unknown = set(kinds) - set(STORES)
    if unknown:
        sys.exit(f"unknown stores: {', '.join(sorted(unknown))}")
    workdir = tempfile.mkdtemp(prefix="wsgisession-bench-")
    started = time.monotonic()
    stores: list[SessionStore] = []
    items: list[Item] = []
    server = redis.Redis.from_url(REDIS_URL)
    try:
        for kind in kinds:
            store = make_store(kind, workdir)
            stores.append(store)
            prepared = prepare(kind, store, args.others)
            for item in prepared:
                size(item, args.batch_ms / 1000, args.min_calls)
            METER.server = server if kind in ("redis", "failover") else None
            for item in prepared:
                count(item, METER.server is not None)
            METER.server = None
            items += prepared
        print(f"{len(items)} items, {args.rounds} rounds", file=sys.stderr, flush=True)
        measure(items, args.rounds)
    finally:
        server.close()
        cleanup(stores, workdir)

    title = f"Median over {args.rounds} rounds of the mean per operation (batches of ~{args.batch_ms:g} ms)"
    title += f"; x: median of the rounds' ratios to the baseline; {args.others} other users' sessions in each store"
    print(f"\n{title}\n")
    header = ["store", "operation", "µs", "±%", "x", "+µs", "round trips", "Redis cmds"]
    print_table(header, report(items), 2, groups=True)
    if args.rst:
        print("\n" + rst(items))
    print(f"\n({time.monotonic() - started:.0f} s)")


if __name__ == "__main__":
    main()
