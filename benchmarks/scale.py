"""Scaling out: one Redis against a three-master Redis Cluster, and PostgreSQL's cleanup of a million expired
sessions while users keep reading theirs.

Run it from the repository root, with redis-server, redis-cli and PostgreSQL on loopback (about three minutes)::

    .venv/bin/pip install -e '.[test]'      # redis, psycopg2, and pytest (the servers come from tests/)
    .venv/bin/python benchmarks/scale.py [--threads 8] [--seconds 6] [--users 1000] [--rows 1000000]

1. Redis: a private redis-server, then a private three-master cluster (tests/redis_topologies.py starts
   both on free loopback ports), each behind SessionMiddleware with RedisStore (``redis://`` and
   ``redis+cluster://``). ``--threads`` threads call the app in-process for ``--seconds`` per workload,
   each request for a random one of ``--users`` logged-in users: ``read`` reads session["user"],
   ``write`` increments a counter (the Lua merge). Requests/s, median and 99th percentile latency.
   In-process, the client's CPU (one Python process, the GIL) is most of a request's cost, and the
   servers share this machine's cores: the cluster's gain is capacity (memory, more machines), not speed here.
2. PostgreSQL (DATABASE_URL, default postgresql://postgres@127.0.0.1:5432/test): a private table with
   ``--rows`` expired sessions (INSERT ... SELECT FROM generate_series) and 10,000 live ones. Two threads
   load live sessions (PostgresStore.load) for 4 s, then go on while PostgresStore.cleanup() deletes the
   expired rows in batches of 1000: rows removed per second, and the readers' latency before and during.

The table is dropped and the servers killed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import psycopg2

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))

from common import loopback_only, print_table
from redis_topologies import ClusterSetup, RedisProcess
from werkzeug.test import create_environ, run_wsgi_app

from wsgisession import Session, SessionMiddleware
from wsgisession.stores.postgres import PostgresStore
from wsgisession.stores.redis import RedisStore
from wsgisession.stores.sql import CLEANUP_BATCH

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIEnvironment

DATABASE_URL = os.environ.get("DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test")
SECRET = "benchmark-secret-0123456789-abcdefghijklmnopqrstuvwxyz"
LIVE_ROWS = 10_000


def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
    session: Session = environ["session"]
    path = environ["PATH_INFO"]
    if path == "/login":
        session.regenerate()
        session["user"] = "someone"
    elif path == "/write":
        session["count"] = session.get("count", 0) + 1
    body = json.dumps({"user": session.get("user")}).encode()
    start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
    return [body]


def request(wsgi: SessionMiddleware, path: str, cookie: str | None = None) -> tuple[str, str | None]:
    environ = create_environ(path, method="POST", headers={"Cookie": cookie} if cookie else {})
    app_iter, status, headers = run_wsgi_app(wsgi, environ, buffered=True)
    b"".join(app_iter)
    if not status.startswith("200"):
        raise RuntimeError(f"{path}: {status}")
    set_cookie = headers.get("Set-Cookie")
    return status, set_cookie.split(";", 1)[0] if set_cookie else cookie


class Figures:
    def __init__(self, count: int, seconds: float, latencies: list[float], errors: int = 0) -> None:
        self.rate = count / seconds if seconds else 0.0
        ordered = sorted(latencies)
        self.p50 = statistics.median(ordered) * 1000 if ordered else float("nan")
        self.p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1000 if ordered else float("nan")
        self.errors = errors


def closed_loop(threads: int, seconds: float, operation: Callable[[random.Random], None]) -> Figures:
    """``threads`` threads calling ``operation`` back to back for ``seconds``: throughput and latencies."""
    stop = threading.Event()
    results: list[tuple[list[float], int]] = []
    lock = threading.Lock()

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        latencies: list[float] = []
        errors = 0
        while not stop.is_set():
            started = time.perf_counter()
            try:
                operation(rng)
            except Exception:
                errors += 1
                continue
            latencies.append(time.perf_counter() - started)
        with lock:
            results.append((latencies, errors))

    pool = [threading.Thread(target=worker, args=(n,)) for n in range(threads)]
    started = time.perf_counter()
    for thread in pool:
        thread.start()
    time.sleep(seconds)
    stop.set()
    for thread in pool:
        thread.join()
    elapsed = time.perf_counter() - started
    latencies = [x for chunk, _ in results for x in chunk]
    return Figures(len(latencies), elapsed, latencies, sum(e for _, e in results))


def redis_rows(name: str, url: str, args: argparse.Namespace) -> list[list[str]]:
    store = RedisStore(url, prefix=f"bench{os.getpid()}:", timeout=2.0)
    wsgi = SessionMiddleware(app, store, secret=SECRET)
    try:
        cookies = [request(wsgi, "/login")[1] for _ in range(args.users)]
        rows = []
        for workload in ("read", "write"):

            def call(rng: random.Random, path: str = f"/{workload}") -> None:
                request(wsgi, path, rng.choice(cookies))

            rows.append(row(f"{name}: {workload}", closed_loop(args.threads, args.seconds, call), "req/s"))
        return rows
    finally:
        store.close()


def cleanup_rows(args: argparse.Namespace) -> list[list[str]]:
    table = f"bench_cleanup_{os.getpid()}"
    store = PostgresStore(DATABASE_URL, table=table, cleanup_interval=0, pool_size=4)
    conn = psycopg2.connect(DATABASE_URL)
    conn.autocommit = True
    try:
        started = time.perf_counter()
        with conn.cursor() as cur:
            cur.execute(f"INSERT INTO {table} (id, data, expires_at) SELECT 'old' || g, '{{\"user\": \"x\"}}', "
                        "now() - interval '1 hour' - g * interval '1 millisecond' FROM generate_series(1, %s) g",
                        (args.rows,))  # fmt: skip
            cur.execute(f"INSERT INTO {table} (id, data, expires_at) SELECT 'live' || g, '{{\"user\": \"x\"}}', "
                        "now() + interval '1 day' FROM generate_series(1, %s) g", (LIVE_ROWS,))  # fmt: skip
            cur.execute(f"VACUUM ANALYZE {table}")
        print(f"  inserted {args.rows:,} expired and {LIVE_ROWS:,} live rows in {time.perf_counter() - started:.1f} s",
              file=sys.stderr)  # fmt: skip

        def read(rng: random.Random) -> None:
            if store.load(f"live{rng.randint(1, LIVE_ROWS)}") is None:
                raise RuntimeError("a live session was not found")

        before = closed_loop(2, 4.0, read)
        outcome: dict[str, Any] = {}

        def clean() -> None:
            t = time.perf_counter()
            outcome["removed"] = store.cleanup()
            outcome["seconds"] = time.perf_counter() - t

        cleaner = threading.Thread(target=clean)
        cleaner.start()
        during = _while_alive(cleaner, read)
        with conn.cursor() as cur:
            cur.execute(f"SELECT count(*) FROM {table}")
            left = cur.fetchone()[0]
            cur.execute(f"VACUUM ANALYZE {table}")
        after = closed_loop(2, 4.0, read)  # the same reads on a table of only the live rows
        removed, seconds = outcome.get("removed", 0), outcome.get("seconds", float("nan"))
        note = f"{removed:,} rows in {seconds:.1f} s, {removed // CLEANUP_BATCH} batches; {left:,} rows left"
        return [
            row(f"PostgreSQL load(), {args.rows + LIVE_ROWS:,} rows stored", before, "req/s"),
            row("PostgreSQL load(), during the cleanup", during, "req/s"),
            row(f"PostgreSQL load(), {LIVE_ROWS:,} rows stored (after it)", after, "req/s"),
            [f"cleanup of {args.rows:,} expired sessions", f"{removed / seconds:,.0f} rows/s", "", "", note],
        ]
    finally:
        store.close()
        with conn.cursor() as cur:
            cur.execute(f"DROP TABLE IF EXISTS {table}")
        conn.close()


def _while_alive(thread: threading.Thread, operation: Callable[[random.Random], None]) -> Figures:
    """Two readers calling ``operation`` for as long as ``thread`` runs."""
    latencies: list[list[float]] = [[], []]
    errors = [0]

    def reader(n: int) -> None:
        rng = random.Random(n)
        while thread.is_alive():
            t = time.perf_counter()
            try:
                operation(rng)
            except Exception:
                errors[0] += 1
                continue
            latencies[n].append(time.perf_counter() - t)

    started = time.perf_counter()
    readers = [threading.Thread(target=reader, args=(n,)) for n in range(2)]
    for r in readers:
        r.start()
    thread.join()
    for r in readers:
        r.join()
    elapsed = time.perf_counter() - started
    every = latencies[0] + latencies[1]
    return Figures(len(every), elapsed, every, errors[0])


def row(name: str, figures: Figures, unit: str) -> list[str]:
    errors = f"{figures.errors} errors" if figures.errors else ""
    return [name, f"{figures.rate:,.0f} {unit}", f"{figures.p50:.2f}", f"{figures.p99:.2f}", errors]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--users", type=int, default=1000)
    parser.add_argument("--rows", type=int, default=1_000_000)
    args = parser.parse_args()
    loopback_only(DATABASE_URL)
    rows: list[list[str]] = []
    root = tempfile.mkdtemp(prefix="wsgisession-bench-")
    single = RedisProcess(root, "single", ["--save", "", "--appendonly", "no"])
    try:
        single.start()
        print("Redis, one server...", file=sys.stderr)
        rows += redis_rows("Redis, 1 server", f"redis://127.0.0.1:{single.port}/0", args)
    finally:
        single.kill()
        shutil.rmtree(root, ignore_errors=True)
    cluster = ClusterSetup()
    try:
        cluster.start()
        print("Redis Cluster, three masters...", file=sys.stderr)
        rows += redis_rows("Redis Cluster, 3 masters", cluster.url(), args)
    finally:
        cluster.close()
    print("PostgreSQL cleanup...", file=sys.stderr)
    rows += cleanup_rows(args)
    print(f"\n{args.threads} threads in one process, {os.cpu_count()} CPUs, {args.users} users per Redis setup\n")
    print_table(["", "throughput", "p50 ms", "p99 ms", ""], rows)


if __name__ == "__main__":
    main()
