"""Lost updates when requests of one session race, for wsgisession and its peers; and what merging costs.

Run it from the repository root, with Redis and PostgreSQL on loopback::

    .venv/bin/pip install -e '.[bench]'     # the peers: Beaker, Flask-Session, Flask-SQLAlchemy
    .venv/bin/python benchmarks/race.py [--pairs 200] [--clients 8]

REDIS_URL and DATABASE_URL (default: redis://127.0.0.1:6379/0 and postgresql://postgres@127.0.0.1:5432/test)
must point at 127.0.0.1 or localhost. Every run uses its own tables and key prefixes and removes them
afterwards. It takes well under two minutes.

The race: one session is created, then ``--pairs`` pairs of requests run in threads (``--clients`` at a
time, so pairs overlap too). Both requests of a pair load the session, meet at a barrier, and each sets
a key of its own; a key missing at the end is a lost update. The same WSGI-level harness drives
wsgisession (Redis, PostgreSQL, SQLite), Beaker's SessionMiddleware (ext:redis, ext:database on
PostgreSQL) and Flask-Session (redis, sqlalchemy on PostgreSQL), each configured as its documentation
shows.

The merge cost: wsgisession saves a 1-key change to a 20-key session with ``store.update`` (an atomic
per-key merge); the alternative is writing the whole session (timed as ``store.create`` on a fresh key).
Each is timed as the median, over several rounds, of the mean time per call.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import statistics
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import psycopg2
import redis
from common import loopback_only, print_table
from werkzeug.test import create_environ, run_wsgi_app

from wsgisession import SessionMiddleware, SessionStore, SQLiteStore
from wsgisession.stores.base import Changes
from wsgisession.stores.postgres import PostgresStore
from wsgisession.stores.redis import RedisStore

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
DATABASE_URL = os.environ.get("DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test")
# SQLAlchemy (Beaker's ext:database, Flask-SQLAlchemy) on the same server, with the driver installed here.
SQLALCHEMY_URL = "postgresql+psycopg2://" + DATABASE_URL.split("://", 1)[1]
SECRET = "benchmark-secret-" + secrets.token_urlsafe(32)
WAIT = 10.0  # a barrier that waits longer fails the request instead of hanging the run
RUN = secrets.token_hex(4)  # in every table name and key prefix of this run


def name(prefix: str) -> str:
    return f"bench_{prefix}_{RUN}"


# -- one WSGI harness for every library ------------------------------------------------


@dataclass
class Subject:
    """A session library wrapped around the race app, and how to clean up after it."""

    library: str
    store: str
    app: WSGIApplication
    cookie_name: str
    cleanups: list[Callable[[], None]] = field(default_factory=list)
    session_ids: list[str] = field(default_factory=list)  # the cookie values of the sessions it created


def call(app: WSGIApplication, path: str, cookie: str | None = None, **extra: Any) -> tuple[str, list[str], bytes]:
    environ = create_environ(path, headers={"Cookie": cookie} if cookie else {})
    environ.update(extra)
    body, status, headers = run_wsgi_app(app, environ, buffered=True)
    return status, headers.getlist("Set-Cookie"), b"".join(body)


def login(subject: Subject) -> str:
    status, cookies, _ = call(subject.app, "/login")
    for header in cookies:
        pair = header.split(";", 1)[0].strip()
        if pair.partition("=")[0] == subject.cookie_name and pair.partition("=")[2]:
            return pair
    raise RuntimeError(f"{subject.library} {subject.store}: /login ({status}) set no {subject.cookie_name} cookie")


def race(subject: Subject, pairs: int, clients: int) -> tuple[int, int]:
    """Run the pairs; return (lost updates, failed requests)."""
    cookie = login(subject)
    subject.session_ids.append(cookie.partition("=")[2])

    def one(key: str, barrier: threading.Barrier) -> bool:
        try:
            status, _, _ = call(subject.app, "/act", cookie, **{"bench.key": key, "bench.barrier": barrier})
            return status.startswith("200")
        except Exception:  # counted and reported; the race goes on
            barrier.abort()
            traceback.print_exc(limit=2)
            return False

    with ThreadPoolExecutor(clients) as pool:
        futures = []
        for i in range(pairs):
            barrier = threading.Barrier(2, timeout=WAIT)
            futures += [pool.submit(one, f"{side}{i}", barrier) for side in "ab"]
        failures = sum(not f.result() for f in futures)
    _, _, body = call(subject.app, "/dump", cookie)
    keys = set(json.loads(body))
    lost = sum(f"{side}{i}" not in keys for i in range(pairs) for side in "ab")
    return lost, failures


def respond(start_response: StartResponse, body: bytes = b"ok") -> Iterable[bytes]:
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]


# -- wsgisession -------------------------------------------------------------------------


def wsgisession_app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
    session = environ["session"]
    path = environ["PATH_INFO"]
    if path == "/login":
        session["user"] = "alice"
    elif path == "/act":
        session.get("user")  # loaded
        environ["bench.barrier"].wait()
        session[environ["bench.key"]] = True
    elif path == "/dump":
        return respond(start_response, json.dumps(list(session)).encode())
    return respond(start_response)


def wsgisession_stores(workdir: str) -> list[tuple[str, SessionStore, Callable[[], None]]]:
    table = name("wsgisession")
    return [
        ("redis", RedisStore(REDIS_URL, prefix=name("wsgisession") + ":"), lambda: redis_delete(name("wsgisession"))),
        ("postgres", PostgresStore(DATABASE_URL, table=table, cleanup_interval=0), lambda: drop_table(table)),
        ("sqlite", SQLiteStore(os.path.join(workdir, "race.sqlite3"), cleanup_interval=0), lambda: None),
    ]


def wsgisession_subjects(stores: list[tuple[str, SessionStore, Callable[[], None]]]) -> list[Subject]:
    return [
        Subject("wsgisession", kind, SessionMiddleware(wsgisession_app, store, secret=SECRET), "session")
        for kind, store, _ in stores
    ]


# -- Beaker ------------------------------------------------------------------------------


def beaker_app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
    session = environ["beaker.session"]
    path = environ["PATH_INFO"]
    if path == "/login":
        session["user"] = "alice"
        session.save()
    elif path == "/act":
        session.get("user")  # loaded
        environ["bench.barrier"].wait()
        session[environ["bench.key"]] = True
        session.save()
    elif path == "/dump":
        return respond(start_response, json.dumps([k for k in session if not k.startswith("_")]).encode())
    return respond(start_response)


def beaker_subjects(workdir: str) -> list[Subject]:
    from beaker.middleware import SessionMiddleware as BeakerMiddleware

    common = {"session.key": "beaker.session.id", "session.timeout": 3600, "session.secret": SECRET,
              "session.lock_dir": os.path.join(workdir, "beaker-lock")}  # fmt: skip
    redis_app = BeakerMiddleware(beaker_app, {**common, "session.type": "ext:redis", "session.url": REDIS_URL})
    table = name("beaker")
    database_app = BeakerMiddleware(beaker_app, {
        **common, "session.type": "ext:database", "session.url": SQLALCHEMY_URL, "session.table_name": table,
    })  # fmt: skip
    redis_subject = Subject("Beaker", "ext:redis", redis_app, "beaker.session.id")
    # Beaker names its Redis keys by session id alone, beaker_cache:<id>:session, and its signed
    # cookie value ends with the id: delete the keys of our sessions only.
    redis_subject.cleanups.append(lambda: beaker_redis_delete(redis_subject.session_ids))
    database_subject = Subject("Beaker", "ext:database (PostgreSQL)", database_app, "beaker.session.id")
    database_subject.cleanups.append(lambda: drop_table(table))
    return [redis_subject, database_subject]


# -- Flask-Session -----------------------------------------------------------------------


def flask_subjects() -> list[Subject]:
    from flask import Flask, jsonify, request, session
    from flask_session import Session
    from flask_sqlalchemy import SQLAlchemy

    def make_app(config: dict[str, Any], with_db: bool = False) -> Flask:
        app = Flask(f"race_{len(config)}")
        app.secret_key = SECRET
        app.config.update(config)
        if with_db:
            app.config["SESSION_SQLALCHEMY"] = SQLAlchemy(app)
        Session(app)

        @app.route("/login")
        def login_view() -> str:
            session["user"] = "alice"
            return "ok"

        @app.route("/act")
        def act_view() -> str:
            session.get("user")  # loaded before the view runs
            request.environ["bench.barrier"].wait()
            session[request.environ["bench.key"]] = True
            return "ok"

        @app.route("/dump")
        def dump_view() -> Any:
            return jsonify(list(session))

        return app

    prefix = name("flask") + ":"
    client = redis.Redis.from_url(REDIS_URL)
    redis_app = make_app({"SESSION_TYPE": "redis", "SESSION_REDIS": client, "SESSION_KEY_PREFIX": prefix})
    table = name("flask")
    sql_app = make_app(
        {"SESSION_TYPE": "sqlalchemy", "SQLALCHEMY_DATABASE_URI": SQLALCHEMY_URL, "SESSION_SQLALCHEMY_TABLE": table},
        with_db=True,
    )
    redis_subject = Subject("Flask-Session", "redis", redis_app, "session", [lambda: redis_delete(prefix)])
    sql_subject = Subject("Flask-Session", "sqlalchemy (PostgreSQL)", sql_app, "session")

    def drop_flask_table() -> None:
        with sql_app.app_context():
            sql_app.config["SESSION_SQLALCHEMY"].engine.dispose()
        drop_table(table)

    sql_subject.cleanups.append(drop_flask_table)
    return [redis_subject, sql_subject]


# -- cleanup helpers ---------------------------------------------------------------------


def redis_delete(prefix: str, owned: Callable[[str], bool] = lambda key: True) -> None:
    client = redis.Redis.from_url(REDIS_URL)
    try:
        keys = [k for k in client.scan_iter(match=prefix + "*") if owned(k.decode())]
        if keys:
            client.delete(*keys)
    finally:
        client.close()


def beaker_redis_delete(cookie_values: list[str]) -> None:
    def ours(key: str) -> bool:
        parts = key.split(":")
        return len(parts) > 2 and any(value.endswith(parts[-2]) for value in cookie_values)

    redis_delete("beaker_cache:", ours)
    redis_delete("beaker_lock:beaker_cache:", ours)


def drop_table(table: str) -> None:
    conn = psycopg2.connect(DATABASE_URL)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute(f"DROP TABLE IF EXISTS {table}")
    finally:
        conn.close()


# -- the cost of merging -----------------------------------------------------------------


def merge_cost(store: SessionStore, rounds: int, calls: int) -> tuple[float, float]:
    """Median µs per call of a 1-key update of a 20-key session, and of writing a whole 20-key session."""
    data = {f"k{j}": json.dumps(f"value number {j} " + "x" * 20) for j in range(20)}
    key = secrets.token_hex(32)
    store.create(key, data, 3600)
    for n in range(20):  # warm up connections and caches
        store.update(key, Changes({"k0": json.dumps(n)}), 3600)
        store.create(secrets.token_hex(32), data, 3600)
    merge, whole = [], []
    for _ in range(rounds):
        start = time.perf_counter()
        for n in range(calls):
            if not store.update(key, Changes({"k0": json.dumps(n)}), 3600):
                raise RuntimeError("the benchmark session vanished")
        merge.append((time.perf_counter() - start) / calls)
        fresh = [secrets.token_hex(32) for _ in range(calls)]
        start = time.perf_counter()
        for k in fresh:
            store.create(k, data, 3600)
        whole.append((time.perf_counter() - start) / calls)
    return statistics.median(merge) * 1e6, statistics.median(whole) * 1e6


# -- main --------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--pairs", type=int, default=200, help="pairs of racing requests per library and store")
    parser.add_argument("--clients", type=int, default=8, help="threads sending them")
    parser.add_argument("--rounds", type=int, default=7, help="rounds of the merge-cost timing")
    parser.add_argument("--calls", type=int, default=200, help="calls per round of the merge-cost timing")
    args = parser.parse_args()
    loopback_only(REDIS_URL, DATABASE_URL)

    workdir = tempfile.mkdtemp(prefix="wsgisession-bench-")
    stores = wsgisession_stores(workdir)
    subjects = wsgisession_subjects(stores)
    cleanups: list[Callable[[], None]] = [store.close for _, store, _ in stores] + [c for _, _, c in stores]
    rows: list[tuple[str, str, int, int, float, int]] = []
    costs: list[tuple[str, float, float]] = []
    started = time.monotonic()
    try:
        for make in (lambda: beaker_subjects(workdir), flask_subjects):
            try:
                subjects += make()
            except ImportError as exc:
                print(f"skipping a peer that is not installed: {exc}", file=sys.stderr)
        for subject in subjects:
            cleanups += subject.cleanups
            print(f"racing {subject.library} {subject.store} ...", file=sys.stderr, flush=True)
            lost, failed = race(subject, args.pairs, args.clients)
            rows.append((subject.library, subject.store, args.pairs, lost, 100 * lost / (2 * args.pairs), failed))
        for kind, store, _ in stores:
            print(f"timing the merge on {kind} ...", file=sys.stderr, flush=True)
            costs.append((kind, *merge_cost(store, args.rounds, args.calls)))
    finally:
        for cleanup in reversed(cleanups):
            try:
                cleanup()
            except Exception as exc:  # clean up the rest anyway
                print(f"cleanup failed: {exc}", file=sys.stderr)
        shutil.rmtree(workdir, ignore_errors=True)

    print(f"\nLost updates: {args.pairs} pairs of concurrent requests on one session, each request setting its own "
          f"key after both loaded ({args.clients} client threads)\n")  # fmt: skip
    print_table(["library", "store", "pairs", "lost updates", "lost %"],
                [(lib, store, str(p), str(lost), f"{pct:.1f}") for lib, store, p, lost, pct, _ in rows], 2)  # fmt: skip
    failed = [(lib, store, f) for lib, store, _, _, _, f in rows if f]
    for lib, store, f in failed:
        print(f"  note: {f} requests failed for {lib} {store} (their keys count as lost)")
    print(f"\nSaving a 1-key change to a 20-key session with wsgisession: merge (store.update) vs whole-session write "
          f"(store.create on a fresh key); median of {args.rounds} rounds of {args.calls} calls\n")  # fmt: skip
    print_table(["store", "merge µs", "whole write µs", "merge / whole"],
                [(kind, f"{m:.0f}", f"{w:.0f}", f"{m / w:.2f}") for kind, m, w in costs])  # fmt: skip
    print(f"\n({time.monotonic() - started:.0f} s)")


if __name__ == "__main__":
    main()
