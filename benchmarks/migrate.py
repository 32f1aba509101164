"""How fast ``wsgisession migrate`` moves sessions between stores, and in how much memory.

Run it from the repository root, with redis-server installed and PostgreSQL on loopback (about seven minutes)::

    .venv/bin/python benchmarks/migrate.py [--sizes 100000,1000000] [--before 100000] [--directions ...]

DATABASE_URL (default postgresql://postgres@127.0.0.1:5432/test) must point at 127.0.0.1 or localhost;
Redis is a private redis-server on a free loopback port (tests/redis_topologies.py starts it, without
persistence; it is killed at the end), SQLite a file in a temporary directory. The table
(``bench_<run>_sessions``) and the key prefix are this run's own, removed afterwards.

For each direction (``--directions``: postgres-redis, redis-postgres, sqlite-postgres) and size
(``--sizes``), the source is filled with that many live sessions in the store's own format, a third of
them bound to a user (three sessions a user): PostgreSQL by one INSERT ... SELECT FROM generate_series,
Redis and SQLite through the store's add_many, a batch at a time. The target is emptied. Then the real
command, ``python -m wsgisession migrate --from SOURCE --to TARGET``, runs as a subprocess:

- ``s`` and ``sessions/s``: its wall-clock time, start-up included, and the sessions moved per second;
- ``peak RSS``: its peak resident memory (``ru_maxrss`` from ``wait4``, by a small launcher process: a
  child's counts the memory of the process that forked it, which the benchmark's own would swamp).

Each run is checked: the target then holds every session (``count()``), the source none.

``one add each``: the same command at ``--before`` sessions with every store's add_many put back to the
loop over add that SessionStore gives (one round trip per session: the command before the batches);
``x`` is each direction's rate with the batches over that one.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import secrets
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any

import psycopg2

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))

from common import drop_run_tables, loopback_only, print_table
from redis_topologies import RedisProcess

from wsgisession.stores.base import USER_KEY, Copy, SessionStore, encode_values
from wsgisession.stores.postgres import PostgresStore
from wsgisession.stores.redis import RedisStore
from wsgisession.stores.sqlite import SQLiteStore

DATABASE_URL = os.environ.get("DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test")
RUN = secrets.token_hex(4)
TABLE = f"bench_{RUN}_sessions"
PREFIX = f"bench_{RUN}_sess:"
DIRECTIONS = ["postgres-redis", "redis-postgres", "sqlite-postgres"]
FILL_BATCH = 1000
BOUND = 3  # one session in BOUND is bound to a user, who has BOUND of them

# Runs a command, then writes its peak RSS (KiB) and exit status to the file named first. A child's
# ru_maxrss starts at the RSS of the process that forked it: that is this small one, not the benchmark.
LAUNCHER = """
import os, sys
pid = os.posix_spawn(sys.argv[2], sys.argv[2:], os.environ)
_, status, usage = os.wait4(pid, 0)
with open(sys.argv[1], "w") as f:
    f.write(f"{usage.ru_maxrss} {os.waitstatus_to_exitcode(status)}")
"""
# The command with every store's add_many back to SessionStore's loop over add: one round trip per session.
PER_SESSION = """
import sys
from wsgisession import cli
from wsgisession.stores import connect_pg, connect_redis, failover, memory, postgres, redis, sqlite
from wsgisession.stores.base import SessionStore

def subclasses(cls):
    for sub in cls.__subclasses__():
        yield sub
        yield from subclasses(sub)

for cls in subclasses(SessionStore):
    if "add_many" in vars(cls):
        cls.add_many = SessionStore.add_many
sys.exit(cli.main(sys.argv[1:]))
"""


class Places:
    """The stores of this run: PostgreSQL's table, the private Redis's prefix, the SQLite file."""

    def __init__(self, redis_url: str, workdir: str) -> None:
        self.urls = {"postgres": DATABASE_URL, "redis": redis_url,
                     "sqlite": f"sqlite:///{os.path.join(workdir, 'sessions.sqlite3')}"}  # fmt: skip
        self.redis = RedisStore(redis_url, prefix=PREFIX, timeout=60)
        self.stores: dict[str, SessionStore] = {
            "postgres": PostgresStore(DATABASE_URL, table=TABLE, cleanup_interval=0),
            "redis": self.redis,
            "sqlite": SQLiteStore(self.urls["sqlite"].removeprefix("sqlite:///"), table=TABLE, cleanup_interval=0),
        }

    def empty(self, kind: str) -> None:
        """Remove every session (and, in Redis, every user's index) from one store."""
        if kind == "redis":
            client = self.redis.client
            names: list[bytes] = []
            for name in client.scan_iter(match=PREFIX + "*", count=10_000):
                names.append(name)
                if len(names) == 10_000:
                    client.unlink(*names)
                    names = []
            if names:
                client.unlink(*names)
        else:
            with cursor(self.urls[kind]) as cur:
                cur.execute(f"DELETE FROM {TABLE}" if kind == "sqlite" else f"TRUNCATE {TABLE}")

    def fill(self, kind: str, n: int) -> float:
        """``n`` live sessions in the store ``kind`` (emptied first); the seconds it took."""
        self.empty(kind)
        started = time.perf_counter()
        if kind == "postgres":
            fill_postgres(n)
        else:
            store = self.stores[kind]
            batch: list[Copy] = []
            for copy in sessions(n):
                batch.append(copy)
                if len(batch) == FILL_BATCH:
                    store.add_many(batch)
                    batch = []
            store.add_many(batch)
        return time.perf_counter() - started

    def close(self) -> None:
        for store in self.stores.values():
            store.close()


@contextlib.contextmanager
def cursor(url: str) -> Iterator[Any]:
    """An autocommit cursor on PostgreSQL, or on a SQLite file (``sqlite:///path``)."""
    if url.startswith("sqlite:///"):
        conn: Any = sqlite3.connect(url.removeprefix("sqlite:///"), isolation_level=None)
    else:
        conn = psycopg2.connect(url)
        conn.autocommit = True
    try:
        cur = conn.cursor()
        yield cur
        cur.close()
    finally:
        conn.close()


def key_of(i: int) -> str:
    """The key of session ``i``: a SHA-256 in hex, as the native format's."""
    return hashlib.sha256(f"{RUN}:{i}".encode()).hexdigest()


def sessions(n: int) -> Iterator[Copy]:
    """``n`` sessions as the application would have stored them (a third bound to a user)."""
    t = time.time()
    for i in range(n):
        data: dict[str, object] = {"n": i, "theme": "dark", "cart": [i, {"name": "zoë 😀", "price": 0.1}]}
        if i % BOUND == 0:
            data[USER_KEY] = {"id": f"user{i // BOUND}", "login": int(t), "seen": int(t)}
        yield key_of(i), encode_values(data), t + 3600 + i % 3600


def fill_postgres(n: int) -> None:
    """The same sessions as :func:`sessions`, by one INSERT ... SELECT in PostgreSQL itself."""
    t = time.time()
    with cursor(DATABASE_URL) as cur:
        cur.execute(
            f"""INSERT INTO {TABLE} (id, data, expires_at)
            SELECT encode(sha256(convert_to(%(run)s || ':' || i, 'UTF8')), 'hex'),
                   jsonb_build_object('n', i, 'theme', 'dark',
                                      'cart', jsonb_build_array(i, jsonb_build_object('name', 'zoë 😀', 'price', 0.1)))
                   || CASE WHEN i %% {BOUND} = 0 THEN jsonb_build_object(%(user)s, jsonb_build_object(
                          'id', 'user' || i / {BOUND}, 'login', %(t)s::bigint, 'seen', %(t)s::bigint))
                      ELSE '{{}}'::jsonb END,
                   to_timestamp(%(t)s + 3600 + i %% 3600)
            FROM generate_series(0, %(n)s - 1) AS i""",
            {"run": RUN, "user": USER_KEY, "t": int(t), "n": n},
        )
        cur.execute(f"ANALYZE {TABLE}")


def migrate(places: Places, source: str, target: str, per_session: bool, workdir: str) -> tuple[float, float, str]:
    """Run the command; its wall-clock seconds, its peak RSS (MiB) and its last line of output."""
    start = ["-c", PER_SESSION] if per_session else ["-m", "wsgisession"]
    command = [sys.executable, *start, "migrate", "--from", places.urls[source], "--to", places.urls[target]]
    env = {**os.environ, "SESSION_TABLE": TABLE, "SESSION_REDIS_PREFIX": PREFIX}
    report = os.path.join(workdir, "report")
    with open(os.path.join(workdir, "out"), "w+") as out:
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", LAUNCHER, report, *command], stdout=out, stderr=out, env=env, check=True)
        took = time.perf_counter() - started
        out.seek(0)
        output = out.read().strip()
    with open(report) as f:
        peak, status = map(int, f.read().split())
    if status:
        sys.exit(f"the command failed ({status}):\n{output}")
    return took, peak / 1024, output.splitlines()[-1]


def measure(places: Places, direction: str, n: int, per_session: bool, workdir: str) -> list[str]:
    source, target = direction.split("-")
    print(f"{direction}: filling {source} with {n:,} sessions...", file=sys.stderr, flush=True)
    filled = places.fill(source, n)
    places.empty(target)
    path = "one add each" if per_session else "add_many"
    print(f"  ({filled:.0f} s) migrate, {path}...", file=sys.stderr, flush=True)
    took, rss, said = migrate(places, source, target, per_session, workdir)
    moved, left = places.stores[target].count(), places.stores[source].count()
    print(f"  {took:.1f} s: {said}", file=sys.stderr, flush=True)
    if moved != n or left:
        sys.exit(f"{direction}: {moved:,} sessions in the target (expected {n:,}), {left:,} left in the source")
    return [f"{source} -> {target}", f"{n:,}", path, f"{took:.1f}", f"{n / took:,.0f}", f"{rss:.1f} MiB"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="100000,1000000", help="comma-separated numbers of sessions")
    parser.add_argument("--before", type=int, default=100_000, help="sessions moved one add each (0: not)")
    parser.add_argument("--directions", default=",".join(DIRECTIONS), help="comma-separated subset of: "
                        + ", ".join(DIRECTIONS))  # fmt: skip
    args = parser.parse_args()
    loopback_only(DATABASE_URL)
    directions = [d.strip() for d in args.directions.split(",")]
    if set(directions) - set(DIRECTIONS):
        sys.exit(f"unknown directions: {', '.join(sorted(set(directions) - set(DIRECTIONS)))}")
    sizes = [int(size) for size in args.sizes.split(",")]
    workdir = tempfile.mkdtemp(prefix="wsgisession-bench-")
    server = RedisProcess(workdir, "redis", ["--save", "", "--appendonly", "no"])
    started = time.monotonic()
    rows: list[list[str]] = []
    places: Places | None = None
    try:
        server.start()
        places = Places(f"redis://127.0.0.1:{server.port}/0", workdir)
        for direction in directions:
            runs = [(n, False) for n in sizes] + ([(args.before, True)] if args.before else [])
            found = [measure(places, direction, n, per_session, workdir) for n, per_session in runs]
            rows += with_ratio(found)
    finally:
        if places is not None:
            places.close()
        server.kill()
        drop_run_tables(DATABASE_URL, RUN)
        shutil.rmtree(workdir, ignore_errors=True)
    load = os.getloadavg()[0]
    print(f"\nwsgisession migrate as a subprocess; {os.cpu_count()} CPUs, load average {load:.1f} at the end\n")
    print_table(["direction", "sessions", "path", "s", "sessions/s", "peak RSS", "x"], rows, 3, groups=True)
    print(f"\n({time.monotonic() - started:.0f} s)")


def with_ratio(rows: list[list[str]]) -> list[list[str]]:
    """Each batched row with its rate over the per-session one of the same direction (if measured)."""
    rate: Callable[[list[str]], float] = lambda row: float(row[4].replace(",", ""))  # noqa: E731
    before = next((row for row in rows if row[2] == "one add each"), None)
    return [[*row, f"{rate(row) / rate(before):.1f}" if before and row is not before else ""] for row in rows]


if __name__ == "__main__":
    main()
