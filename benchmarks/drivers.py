"""psycopg 3 beside psycopg2: what PostgresStore costs on each driver, and the same statements by hand.

Run it from the repository root, with PostgreSQL on loopback (about a minute; ``--quick``: about 10 s)::

    .venv/bin/pip install -e '.[bench]'     # both drivers, and what bench.py imports
    .venv/bin/python benchmarks/drivers.py [--quick] [--rounds 31] [--batch-ms 60] [--rst]

TEST_DATABASE_URL, else DATABASE_URL (default postgresql://postgres@127.0.0.1:5432/test), must point at
127.0.0.1 or localhost. One table of this run, dropped afterwards. Per driver, in-process:

- ``floor``: the store's own statements (their text taken from the store) by hand on one connection of the
  driver, one cursor, no pool, JSON by the driver's defaults (json): prepared where the store prepares them
  (psycopg2: PREPARE once, then EXECUTE; psycopg 3: ``execute(..., prepare=True)``), plain elsewhere, and
  in a pipeline on psycopg 3 where the store pipelines;
- ``wsgisession``: PostgresStore(driver=...) on the same table.

Operations: ``load`` of a live session; ``create`` of a new one; ``update``, a Changes merge; ``touch``;
``request``, a logged-in read of ``session["user_id"]`` through SessionMiddleware (the floor: bench.py's
raw app over the hand-written load); ``delete_many`` of 1001 keys (one DELETE of an array of keys; the
rows are inserted before each call, outside the timing); and what psycopg 3 pipelines, ``replace``, the
compare-and-set (BEGIN, SELECT ... FOR UPDATE, UPDATE, COMMIT). Round trips are the same on both drivers
but for that one: psycopg2 waits for each statement (4), psycopg 3 sends them in two (the UPDATE waits
for the SELECT's row).

Each round times a batch of every case (about ``--batch-ms`` long), the two drivers next to each other,
psycopg2 first in one round and psycopg 3 in the next; ``µs`` is the median over the rounds of a case's
mean per operation, ``±%`` the interquartile range over the rounds, ``cpu`` this process's CPU time per
operation (time.process_time: the server's is not in it; a steadier figure than time on a busy machine).
Ratios are the median over the rounds of the ratio of two batches of the same round. ``--rst`` adds the
README's table.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import platform
import sys
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import psycopg
import psycopg2
from apps import TTL, USER_ID, login_data, raw_app, wsgisession_app
from bench import DATABASE_URL, RUN, Timing, batch, call, paired, summary
from common import close_all, drop_run_tables, loopback_only, print_table, rst_table
from werkzeug.test import create_environ

from wsgisession import SessionMiddleware
from wsgisession.stores.base import Changes, encode_values
from wsgisession.stores.postgres import PostgresStore
from wsgisession.stores.psycopg2_driver import _prepared

URL = os.environ.get("TEST_DATABASE_URL", DATABASE_URL)
TABLE = f"bench_{RUN}_drivers"
DRIVERS = {"psycopg2": "psycopg2", "psycopg": "psycopg 3"}  # name: label
VARIANTS = ("floor", "wsgisession")
OPERATIONS = ("load", "create", "update", "touch", "request", "delete_many", "replace")
DELETED = 1001
EXPECTED, NEW = {"user_id": USER_ID}, {"counter": 7}  # what replace compares; what update and replace write


# -- by hand -----------------------------------------------------------------------------


class Floor(ABC):
    """The store's statements by hand on one connection (and one cursor) of a driver: a bench.py raw
    backend (``load`` and ``save``), with the rest of what is timed. Those run with ``prepare`` are the
    ones the store prepares."""

    def __init__(self, store: PostgresStore) -> None:
        self.store = store  # the statements' text
        self.conn = self.connect()
        self.cur = self.conn.cursor()

    @abstractmethod
    def connect(self) -> Any:
        """One connection, in autocommit mode."""

    @abstractmethod
    def execute(self, sql: str, params: tuple[Any, ...], prepare: bool = False) -> None:
        """Run ``sql``, as a prepared statement when ``prepare``."""

    def pipeline(self) -> contextlib.AbstractContextManager[Any]:
        """Where the statements run are sent together, when the driver can."""
        return contextlib.nullcontext()

    def load(self, key: str) -> dict[str, Any] | None:
        self.execute(self.store._sql_load, (key,), True)
        row = self.cur.fetchone()
        return row[0] if row is not None and row[1] > time.time() else None

    def save(self, key: str, data: dict[str, Any]) -> None:
        self.execute(self.store._sql_create, (key, json.dumps(data), time.time() + TTL), True)

    def update(self, key: str, changes: dict[str, Any]) -> bool:
        t = time.time()
        self.execute(self.store._sql_merge, ([], json.dumps(changes), t + TTL, key, t), True)
        return bool(self.cur.rowcount)

    def touch(self, key: str) -> bool:
        t = time.time()
        self.execute(self.store._sql_touch, (t + TTL, key, t), True)
        return bool(self.cur.rowcount)

    def delete_many(self, keys: list[str]) -> None:
        self.execute(self.store._sql_delete_many, (keys,), True)

    def replace(self, key: str, expected: dict[str, Any], new: dict[str, Any]) -> bool:
        with self.pipeline():
            self.execute("BEGIN", ())
            try:
                self.execute(self.store._sql_read_live, (key, time.time()))
                row = self.cur.fetchone()
                if row is None or any(row[0].get(k) != v for k, v in expected.items()):
                    return False
                self.execute(self.store._sql_rewrite, (json.dumps({**row[0], **new}), row[1], key))
                return True
            finally:
                self.execute("COMMIT", ())

    def close(self) -> None:
        self.conn.close()


class Psycopg2Floor(Floor):
    """psycopg2: the prepared statements PREPAREd once (as the store names them), then run by EXECUTE."""

    def __init__(self, store: PostgresStore) -> None:
        super().__init__(store)
        prepared = (store._sql_load, store._sql_create, store._sql_merge, store._sql_touch, store._sql_delete_many)
        statements = {sql: _prepared(sql) for sql in prepared}
        for statement in statements.values():
            self.cur.execute(statement.prepare)
        self.executes = {sql: statement.execute for sql, statement in statements.items()}

    def connect(self) -> Any:
        conn = psycopg2.connect(URL)
        conn.autocommit = True
        return conn

    def execute(self, sql: str, params: tuple[Any, ...], prepare: bool = False) -> None:
        self.cur.execute(self.executes[sql] if prepare else sql, params)


class PsycopgFloor(Floor):
    """psycopg 3: its own prepared statements, and its pipeline."""

    def connect(self) -> Any:
        return psycopg.connect(URL, autocommit=True)

    def execute(self, sql: str, params: tuple[Any, ...], prepare: bool = False) -> None:
        self.cur.execute(sql, params, prepare=prepare)

    def pipeline(self) -> contextlib.AbstractContextManager[Any]:
        pipeline: psycopg.Pipeline = self.conn.pipeline()
        return pipeline


FLOORS: dict[str, type[Floor]] = {"psycopg2": Psycopg2Floor, "psycopg": PsycopgFloor}


# -- what is timed -----------------------------------------------------------------------


Run = Callable[[int], tuple[float, float]]  # n operations, timed: the mean seconds per operation, elapsed and CPU


@dataclass
class Case:
    operation: str
    variant: str
    driver: str
    run: Run
    most: int = 100_000  # operations in a batch
    calls: int = 0
    wall: list[float] = field(default_factory=list)  # µs per operation, in each round
    cpu: list[float] = field(default_factory=list)


def timed(operation: Callable[[], object], calls: int) -> tuple[float, float]:
    """Mean seconds per call of ``operation`` over ``calls`` calls: elapsed, and this process's CPU time."""
    started, cpu = time.perf_counter(), time.process_time()
    for _ in range(calls):
        operation()
    return (time.perf_counter() - started) / calls, (time.process_time() - cpu) / calls


def repeated(operation: Callable[[], object]) -> Run:
    return lambda calls: timed(operation, calls)


def requests(app: Any, cookie: str) -> Run:
    environ = create_environ("/read", "http://127.0.0.1/", headers={"Cookie": cookie})
    return lambda calls: batch(app, environ, calls)


def deletions(delete_many: Callable[[list[str]], None], admin: Any, prefix: str) -> Run:
    """delete_many of DELETED keys, each call of rows inserted just before it (outside the timing)."""
    keys = [f"{prefix}{n}" for n in range(DELETED)]

    def run(calls: int) -> tuple[float, float]:
        wall = cpu = 0.0
        for _ in range(calls):
            fill(admin, prefix)
            w, c = timed(lambda: delete_many(keys), 1)
            wall, cpu = wall + w, cpu + c
        return wall / calls, cpu / calls

    return run


def fill(admin: Any, prefix: str) -> None:
    """DELETED live rows, keys ``<prefix>0`` to ``<prefix>1000``."""
    admin.execute(f"INSERT INTO {TABLE} (id, data, expires_at) SELECT %s || g, %s::jsonb, now() + interval '1 day' "
                  "FROM generate_series(0, %s) g", (prefix, json.dumps(login_data()), DELETED - 1))  # fmt: skip


def left(admin: Any, prefix: str) -> int:
    admin.execute(f"SELECT count(*) FROM {TABLE} WHERE id LIKE %s", (prefix + "%",))
    return int(admin.fetchone()[0])


def expect(what: str, got: object, wanted: object) -> None:
    if got != wanted:
        raise RuntimeError(f"{what}: {got!r}, not {wanted!r}")


def prepare(driver: str, store: PostgresStore, floor: Floor, admin: Any) -> list[Case]:
    """The driver's cases, once each does what it says."""
    counter = itertools.count()
    data = login_data()
    ws = SessionMiddleware(wsgisession_app, store, secret=os.environ["BENCH_SECRET"], max_age=TTL)
    _, cookies, _ = call(ws, "/login")
    raw = raw_app(floor)
    floor_key, store_key = f"{driver}-floor-live", f"{driver}-wsgisession-live"  # update, touch, replace write them
    floor_cookie = f"session={driver}-floor-request"
    for key in (floor_key, store_key, floor_cookie.partition("=")[2]):
        floor.save(key, data)
    encoded, expected, texts = encode_values(data), encode_values(EXPECTED), encode_values(NEW)
    record = store.load(store_key)
    expect(f"{driver}: floor load", floor.load(floor_key), data)
    expect(f"{driver}: load", record and record.data, data)
    expect(f"{driver}: floor update", floor.update(floor_key, NEW), True)
    expect(f"{driver}: update", store.update(store_key, Changes(texts), TTL), True)
    expect(f"{driver}: floor touch", floor.touch(floor_key), True)
    expect(f"{driver}: touch", store.touch(store_key, TTL), True)
    expect(f"{driver}: floor replace", floor.replace(floor_key, EXPECTED, NEW), True)
    expect(f"{driver}: replace", store.replace(store_key, expected, texts), True)
    store_cookie = cookies[0].split(";", 1)[0]
    for app, cookie in ((raw, floor_cookie), (ws, store_cookie)):
        expect(f"{driver}: a read request", call(app, "/read", cookie)[2], str(USER_ID).encode())

    def new_key() -> str:
        return f"{driver}-new-{next(counter)}"

    cases = [
        Case("load", "floor", driver, repeated(lambda: floor.load(floor_key))),
        Case("load", "wsgisession", driver, repeated(lambda: store.load(store_key))),
        Case("create", "floor", driver, repeated(lambda: floor.save(new_key(), data))),
        Case("create", "wsgisession", driver, repeated(lambda: store.create(new_key(), encoded, TTL))),
        Case("update", "floor", driver, repeated(lambda: floor.update(floor_key, NEW))),
        Case("update", "wsgisession", driver, repeated(lambda: store.update(store_key, Changes(texts), TTL))),
        Case("touch", "floor", driver, repeated(lambda: floor.touch(floor_key))),
        Case("touch", "wsgisession", driver, repeated(lambda: store.touch(store_key, TTL))),
        Case("request", "floor", driver, requests(raw, floor_cookie)),
        Case("request", "wsgisession", driver, requests(ws, store_cookie)),
        Case("replace", "floor", driver, repeated(lambda: floor.replace(floor_key, EXPECTED, NEW))),
        Case("replace", "wsgisession", driver, repeated(lambda: store.replace(store_key, expected, texts))),
    ]
    for variant, delete_many in (("floor", floor.delete_many), ("wsgisession", store.delete_many)):
        prefix = f"{driver}-{variant}-deleted-"
        case = Case("delete_many", variant, driver, deletions(delete_many, admin, prefix), most=10)
        case.run(1)
        expect(f"{driver}: {variant} delete_many leaves", left(admin, prefix), 0)
        cases.append(case)
    return cases


def size(case: Case, batch_s: float, min_calls: int) -> None:
    """Warm the case up, and size its batches."""
    case.run(min(20, case.most))
    per_call = case.run(min(50, case.most))[0]
    case.calls = max(min(min_calls, case.most), min(case.most, int(batch_s / per_call)))


def measure(cases: dict[tuple[str, str, str], Case], rounds: int) -> None:
    """Each round: every operation and variant, the drivers next to each other (A B, then B A next round)."""
    names = list(DRIVERS)
    for r in range(rounds):
        print(f"  round {r + 1}/{rounds}", file=sys.stderr, flush=True)
        for operation in OPERATIONS:
            for variant in VARIANTS:
                for driver in names if r % 2 == 0 else names[::-1]:
                    case = cases[operation, variant, driver]
                    wall, cpu = case.run(case.calls)
                    case.wall.append(wall * 1e6)
                    case.cpu.append(cpu * 1e6)


# -- the report --------------------------------------------------------------------------


@dataclass
class Figures:
    """A case's time and CPU time per operation."""

    wall: Timing
    cpu: Timing

    @classmethod
    def of(cls, case: Case) -> Figures:
        return cls(summary(case.wall), summary(case.cpu))

    def over(self, other: Figures) -> tuple[float, float]:
        """This case over ``other``: the median of the rounds' ratios, of time and of CPU time."""
        return paired(self.wall, other.wall), paired(self.cpu, other.cpu)


def report(cases: dict[tuple[str, str, str], Case]) -> tuple[list[list[str]], list[list[str]]]:
    """The rows of the two tables: per operation and driver, and psycopg 3 over psycopg2."""
    figures = {k: Figures.of(case) for k, case in cases.items()}
    rows, ratios = [], []
    for operation in OPERATIONS:
        for driver, label in DRIVERS.items():
            floor, ws = figures[operation, "floor", driver], figures[operation, "wsgisession", driver]
            x, cpu_x = ws.over(floor)
            rows.append([operation, label, f"{floor.wall.us:.1f}", f"{floor.wall.spread:.0f}", f"{floor.cpu.us:.1f}",
                         f"{ws.wall.us:.1f}", f"{ws.wall.spread:.0f}", f"{ws.cpu.us:.1f}", f"{x:.2f}",
                         f"{cpu_x:.2f}", f"{ws.wall.us - floor.wall.us:+.1f}"])  # fmt: skip
        pairs = [
            figures[operation, variant, "psycopg"].over(figures[operation, variant, "psycopg2"]) for variant in VARIANTS
        ]
        ratios.append([operation, *(f"{r:.2f}" for pair in pairs for r in pair)])
    return rows, ratios


RST_ROWS = {"load": "Read (load)", "update": "Write (update)", "request": "Request (a read)",
            "delete_many": "delete_many, 1001 keys", "replace": "replace (compare-and-set)"}  # fmt: skip


def rst(cases: dict[tuple[str, str, str], Case]) -> str:
    """The README's table: per operation, each driver's µs (and CPU µs), psycopg 3 over psycopg2, and
    wsgisession over the floor on each driver."""
    figures = {k: Figures.of(case) for k, case in cases.items()}
    header = ["Operation", "psycopg2", "psycopg 3", "psycopg 3 / psycopg2", "wsgisession / floor"]
    rows = [header]
    for operation, label in RST_ROWS.items():
        ws = {d: figures[operation, "wsgisession", d] for d in DRIVERS}
        floors = [ws[d].over(figures[operation, "floor", d])[0] for d in DRIVERS]
        time_x, cpu_x = ws["psycopg"].over(ws["psycopg2"])
        rows.append([label, *(f"{ws[d].wall.us:.0f} µs ({ws[d].cpu.us:.0f} CPU)" for d in DRIVERS),
                     f"{time_x:.2f}x time, {cpu_x:.2f}x CPU", " / ".join(f"{x:.2f}x" for x in floors)])  # fmt: skip
    return rst_table(rows)


# -- main --------------------------------------------------------------------------------


@contextlib.contextmanager
def admin_cursor() -> Iterator[Any]:
    """A cursor of a connection of its own, for what is not timed."""
    conn = psycopg2.connect(URL)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            yield cur
    finally:
        conn.close()


def versions(cur: Any) -> str:
    cur.execute("SHOW server_version")
    server = cur.fetchone()[0].split()[0]
    return (
        f"PostgreSQL {server}, psycopg {psycopg.__version__} ({psycopg.pq.__impl__}), psycopg2 "
        f"{psycopg2.__version__.split()[0]}, Python {platform.python_version()}, {os.cpu_count()} CPUs"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="9 rounds of 25 ms batches (under 30 s)")
    parser.add_argument("--rounds", type=int, default=31, help="rounds (the median is reported)")
    parser.add_argument("--batch-ms", type=float, default=60, help="length of one batch of a case")
    parser.add_argument("--min-calls", type=int, default=3, help="fewest operations in a batch")
    parser.add_argument("--rst", action="store_true", help="also print the README's table")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.batch_ms = 9, 25
    loopback_only(URL)
    started = time.monotonic()
    load_before = os.getloadavg()[0]
    cases: dict[tuple[str, str, str], Case] = {}
    closers: list[tuple[str, Callable[[], object]]] = []
    try:
        with admin_cursor() as admin:
            about = versions(admin)
            for driver in DRIVERS:
                store = PostgresStore(URL, table=TABLE, cleanup_interval=0, driver=driver)
                closers.append((f"{driver} store", store.close))
                floor = FLOORS[driver](store)
                closers.append((f"{driver} floor", floor.close))
                for case in prepare(driver, store, floor, admin):
                    cases[case.operation, case.variant, case.driver] = case
            for case in cases.values():
                size(case, args.batch_ms / 1000, args.min_calls)
            print(f"{len(cases)} cases, {args.rounds} rounds", file=sys.stderr, flush=True)
            measure(cases, args.rounds)
    finally:
        close_all(closers)
        drop_run_tables(URL, RUN)

    rows, ratios = report(cases)
    print(f"\n{about}; load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after")
    print(f"Median over {args.rounds} rounds of the mean per operation (batches of ~{args.batch_ms:g} ms); "
          "cpu: this process's CPU time; x: median of the rounds' ratios\n")  # fmt: skip
    header = ["operation", "driver", "floor µs", "±%", "cpu µs", "wsgisession µs", "±%", "cpu µs", "xfloor",
              "cpu xfloor", "+µs"]  # fmt: skip
    print_table(header, rows, 2, groups=True)
    print("\npsycopg 3 / psycopg2\n")
    print_table(["operation", "floor x", "floor cpu x", "wsgisession x", "wsgisession cpu x"], ratios)
    if args.rst:
        print("\n" + rst(cases))
    print(f"\n({time.monotonic() - started:.0f} s)")


if __name__ == "__main__":
    main()
