"""The PostgreSQL drivers: which one a store runs on, and what psycopg 3 does that psycopg2 cannot
(psycopg_pool, prepared statements named alike on every connection, pipelines), against real servers."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from urllib.parse import urlsplit, urlunsplit

import pytest
from pg_server import PostgresServer
from servers import SECRET, drop_table, each_pg_driver, pg_sql, require_postgres, running, unique
from test_round_trips import PostgresProxy, Wire

from wsgisession import StoreError
from wsgisession.builders import postgres_from
from wsgisession.settings import ConfigError, Settings
from wsgisession.stores.base import Changes
from wsgisession.stores.pg_driver import default_driver
from wsgisession.stores.postgres import PostgresStore


@pytest.fixture
def table() -> Iterator[str]:
    name = unique("drv")
    yield name
    drop_table(require_postgres(), name)


def settings(**env: str) -> Settings:
    return Settings.load({"SESSION_SECRET": SECRET, "DATABASE_URL": require_postgres(), **env})


# -- which driver ------------------------------------------------------------------------------------


def test_psycopg_3_is_the_default_when_installed(table: str) -> None:
    assert default_driver() == "psycopg"
    store = postgres_from(settings(SESSION_TABLE=table), cleanup_interval=0)
    try:
        assert store.driver.name == "psycopg"
    finally:
        store.close()


@each_pg_driver
def test_session_pg_driver_chooses(pg_driver: str, table: str) -> None:
    store = postgres_from(settings(SESSION_PG_DRIVER=pg_driver, SESSION_TABLE=table), cleanup_interval=0)
    try:
        store.setup()
        store.create("k", {"n": "1"}, 60)
        assert store.driver.name == pg_driver
        assert store.load("k") is not None
    finally:
        store.close()


def test_an_unknown_driver_is_refused_at_start_up() -> None:
    with pytest.raises(ConfigError, match=r"SESSION_PG_DRIVER must be psycopg \(psycopg 3\) or psycopg2, not 'pg8000'"):
        settings(SESSION_PG_DRIVER="pg8000")


@pytest.mark.parametrize(("hidden", "driver", "extra"), [("psycopg_pool", "psycopg", "psycopg"),
                                                         ("psycopg2", "psycopg2", "postgres")])  # fmt: skip
def test_a_driver_not_installed_is_named_with_its_extra(hidden: str, driver: str, extra: str) -> None:
    """In a process where the module cannot be imported (as if it were not installed)."""
    code = f"""
import sys
sys.modules[{hidden!r}] = None
from wsgisession.builders import postgres_from
from wsgisession.settings import ConfigError, Settings
s = Settings.load({{"SESSION_SECRET": {SECRET!r}, "DATABASE_URL": "postgresql://u@127.0.0.1/db",
                   "SESSION_PG_DRIVER": {driver!r}}})
try:
    postgres_from(s, 0)
except ConfigError as exc:
    print(exc)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60).stdout
    assert f"the PostgreSQL driver {driver} is not installed" in out, out
    assert f"pip install 'wsgisession[{extra}]'" in out, out


def test_without_psycopg_pool_the_default_is_psycopg2() -> None:
    code = "import sys; sys.modules['psycopg_pool'] = None\nfrom wsgisession.stores.pg_driver import default_driver\n"
    code += "print(default_driver())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60).stdout
    assert out.strip() == "psycopg2"


@each_pg_driver
def test_a_bad_url_is_refused_without_quoting_its_password(pg_driver: str) -> None:
    with pytest.raises(ConfigError) as caught:
        postgres_from(settings(DATABASE_URL="postgres://u:hunter2@[::1/db", SESSION_PG_DRIVER=pg_driver), 0)
    assert "not a PostgreSQL URL" in str(caught.value) and "hunter2" not in str(caught.value)


# -- round trips ---------------------------------------------------------------------------------------


@contextlib.contextmanager
def counted(driver: str, table: str, **options: object) -> Iterator[tuple[PostgresStore, Wire]]:
    """A store whose every round trip (a simple query, or an extended-protocol Sync) is counted."""
    wire = Wire()
    url = urlsplit(require_postgres())
    proxy = PostgresProxy((url.hostname or "127.0.0.1", url.port or 5432), wire)
    through = urlunsplit(url._replace(netloc=f"{url.username}@127.0.0.1:{proxy.port}"))
    store = PostgresStore(through, table=table, cleanup_interval=0, driver=driver, pool_size=1, **options)
    try:
        yield store, wire
    finally:
        store.close()
        proxy.close()


def trips(wire: Wire, action: object) -> int:
    before = len(wire.trips)
    action()  # type: ignore[operator]
    return len(wire.trips) - before


@pytest.mark.parametrize(("driver", "expected"), [("psycopg", (1, 1, 1, 1)), ("psycopg2", (1, 1, 4, 1))])
def test_round_trips_of_the_operations_that_send_several_statements_or_prepare(
    driver: str, expected: tuple[int, ...], table: str
) -> None:
    """A long list is ended in one statement; psycopg 3 pipelines a read-compare-write's four statements
    (it waits for the read's answer by a Flush in the pipeline: two round trips, one Sync); a first run of
    a prepared statement goes with its preparation. Counted: simple queries and Syncs."""
    with counted(driver, table) as (store, wire):
        keys = [f"k{n}" for n in range(1001)]
        assert store.add_many([(key, {"n": "1"}, time.time() + 60) for key in keys]) == 1001
        assert trips(wire, lambda: store.delete_many(keys)) == expected[0]
        assert trips(wire, lambda: store.create("k", {"n": "1"}, 60)) == expected[1]  # prepared on first use
        assert trips(wire, lambda: store.replace("k", {"n": "1"}, {"n": "2"})) == expected[2]
        assert trips(wire, lambda: store.update("k", Changes({"n": "3"}), 60)) == expected[3]
        record = store.load("k")
        assert record is not None and record.data == {"n": 3}
        assert store.count() == 1


@pytest.mark.parametrize(("driver", "expected"), [("psycopg", 1), ("psycopg2", 7)])
def test_setup_is_one_round_trip_on_psycopg_3(driver: str, expected: int, table: str) -> None:
    with counted(driver, table, create_table=False) as (store, wire):
        assert trips(wire, store.setup) == expected
        store.create("k", {"n": "1"}, 60)


# -- prepared statements ---------------------------------------------------------------------------


def prepared_names(store: PostgresStore) -> set[str]:
    with store._cursor() as cur:
        cur.execute("SELECT name FROM pg_prepared_statements")
        return {name for (name,) in cur.fetchall()}


def test_a_statement_has_the_same_name_on_every_connection(table: str) -> None:
    """psycopg numbers its statements per connection (_pg3_0, _pg3_1...) in the order they are first
    run: behind PgBouncer before 1.21 in transaction mode, one client's _pg3_0 could then run on a server
    connection where _pg3_0 is another statement. Named after their text, they cannot."""
    url = require_postgres()
    one = PostgresStore(url, table=table, cleanup_interval=0, driver="psycopg", pool_size=1)
    other = PostgresStore(url, table=table, cleanup_interval=0, driver="psycopg", pool_size=1)
    try:
        one.create("k", {"n": "1"}, 60)
        assert one.load("k") is not None
        assert other.load("k") is not None  # the other way round
        other.create("k", {"n": "1"}, 60)
        names = prepared_names(one)
        assert len(names) == 2 and all(name.startswith("wsgisession_") for name in names), names
        assert prepared_names(other) == names
    finally:
        one.close()
        other.close()


# -- the pool ---------------------------------------------------------------------------------------


@each_pg_driver
def test_a_restarted_server_is_found_again_without_a_failed_read(pg_driver: str) -> None:
    """After a restart every pooled connection is dead: the first read finds that out, the pool lets
    them go, and the read is run again on a new connection."""
    with running(PostgresServer()) as server:
        store = PostgresStore(server.url, cleanup_interval=0, driver=pg_driver, pool_size=4, timeout=1)
        try:
            store.create("k", {"n": "1"}, 600)
            with store._cursor(), store._cursor(), store._cursor():
                pass  # three connections in the pool
            assert store.load("k") is not None
            server.stop()
            with pytest.raises(StoreError):
                store.load("k")
            server.start()
            for _ in range(3):
                record = store.load("k")
                assert record is not None and record.data == {"n": 1}
            store.create("k2", {"n": "2"}, 600)
        finally:
            store.close()


def pool_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name.startswith("wsgisession-worker")}


def test_psycopg_pool_starts_on_first_use_not_when_the_store_is_built(table: str) -> None:
    """A gunicorn master with --preload builds the store, then forks: no pool (no connection, no
    thread) of the master's may be what the workers use."""
    require_postgres()
    before = pool_threads()
    store = PostgresStore(require_postgres(), table=table, cleanup_interval=0, driver="psycopg")  # runs setup()
    try:
        assert pool_threads() == before
        store.ping()
        assert pool_threads() - before
    finally:
        store.close()


@each_pg_driver
def test_connections_the_server_ended_are_all_let_go_after_the_first_is_found(pg_driver: str, table: str) -> None:
    """Every pooled connection ended by the server (a failover, pg_terminate_backend): the read that
    finds the first one dead is run again, and must not be lent another dead one."""
    url = require_postgres()
    store = PostgresStore(url, table=table, cleanup_interval=0, driver=pg_driver, pool_size=4)
    try:
        store.create("k", {"n": "1"}, 600)
        with store._cursor() as a, store._cursor() as b, store._cursor() as c:
            pids = [cur.connection.info.backend_pid for cur in (a, b, c)]
        pg_sql(url, "SELECT pg_terminate_backend(pid) FROM unnest(%s) pid", (pids,))
        record = store.load("k")
        assert record is not None and record.data == {"n": 1}
    finally:
        store.close()
