"""The SQL stores' batched cleanup and their cleanup thread: batches, logging, the thread's life,
several processes cleaning one table, and forked children."""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import os
import select
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from servers import each_pg_driver, pg_sql

from wsgisession import MemoryStore, SessionStore, SQLiteStore, StoreError
from wsgisession.stores import Changes
from wsgisession.stores.base import Periodic
from wsgisession.stores.failover import FailoverStore
from wsgisession.stores.postgres import PostgresStore
from wsgisession.stores.sql import SQLStore

SQL_KINDS = ["sqlite", "postgres-psycopg", "postgres-psycopg2"]
THREAD_NAME = "wsgisession-cleanup"
TTL = 60.0


def new_key() -> str:
    return hashlib.sha256(uuid.uuid4().bytes).hexdigest()


def cleanup_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == THREAD_NAME and t.is_alive()]


def wait_for(condition: Callable[[], bool], timeout: float = 5.0, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(interval)
    return condition()


def sql(store: SQLStore, statement: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Run one statement on a connection of the test's own (not the store's); return the rows."""
    if isinstance(store, SQLiteStore):
        conn = sqlite3.connect(store.path, isolation_level=None, timeout=10)
        try:
            cur = conn.execute(statement.replace("%s", "?"), params)
            return cur.fetchall() if cur.description else []
        finally:
            conn.close()
    assert isinstance(store, PostgresStore)
    return pg_sql(store.dsn, statement, params)


def row_count(store: SQLStore) -> int:
    return int(sql(store, f"SELECT count(*) FROM {store.table}")[0][0])


def insert_expired(store: SQLStore, count: int, tag: str = "") -> None:
    """Insert ``count`` rows that expired an hour ago, in one transaction (quick)."""
    tag = tag or uuid.uuid4().hex[:8]
    if isinstance(store, SQLiteStore):
        conn = sqlite3.connect(store.path, isolation_level=None, timeout=10)
        try:
            conn.execute("BEGIN")
            conn.executemany(
                f"INSERT INTO {store.table} (id, data, expires_at) VALUES (?, ?, ?)",
                ((f"expired-{tag}-{i}", '{"a":1}', time.time() - 3600) for i in range(count)),
            )
            conn.execute("COMMIT")
        finally:
            conn.close()
    else:
        sql(
            store,
            f"INSERT INTO {store.table} (id, data, expires_at) "
            f"SELECT 'expired-' || %s || '-' || g, '{{\"a\":1}}'::jsonb, now() - interval '1 hour' "
            f"FROM generate_series(1, %s) AS g",
            (tag, count),
        )


def create_live(store: SessionStore, count: int) -> list[str]:
    keys = [new_key() for _ in range(count)]
    for i, key in enumerate(keys):
        store.create(key, {"i": json.dumps(i)}, TTL)
    return keys


def assert_live(store: SessionStore, keys: list[str]) -> None:
    for i, key in enumerate(keys):
        record = store.load(key)
        assert record is not None, "a live session was cleaned up"
        assert record.data == {"i": i}


def cleaned_messages(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "wsgisession" and r.getMessage().startswith("Cleaned up")]


# -- one cleanup() call, several batches --------------------------------------------------


@pytest.mark.parametrize("kind", SQL_KINDS)
@pytest.mark.parametrize("expired", [1000, 2500])
def test_cleanup_removes_every_batch_and_counts(
    make_store: Callable[..., SessionStore], caplog: pytest.LogCaptureFixture, kind: str, expired: int
) -> None:
    store = make_store(kind)
    assert isinstance(store, SQLStore)
    live = create_live(store, 5)
    insert_expired(store, expired)
    assert row_count(store) == expired + 5
    caplog.set_level(logging.INFO, logger="wsgisession")

    assert store.cleanup() == expired
    assert row_count(store) == 5
    assert_live(store, live)
    messages = cleaned_messages(caplog)
    assert [r.getMessage() for r in messages] == [f"Cleaned up {expired} expired sessions"]
    assert messages[0].levelno == logging.INFO

    caplog.clear()
    assert store.cleanup() == 0
    assert cleaned_messages(caplog) == [], "a cleanup that removed nothing should not log"
    assert_live(store, live)


# -- the cleanup thread -------------------------------------------------------------------


@pytest.mark.parametrize("kind", SQL_KINDS)
def test_cleanup_thread_starts_on_first_use_cleans_and_stops_on_close(
    make_store: Callable[..., SessionStore], caplog: pytest.LogCaptureFixture, kind: str
) -> None:
    caplog.set_level(logging.INFO, logger="wsgisession")
    before = set(cleanup_threads())
    if kind.startswith("postgres"):
        # The table exists (made by another store); this one is built without touching the server.
        owner = make_store(kind)
        assert isinstance(owner, PostgresStore)
        store = make_store(kind, table=owner.table, create_table=False, cleanup_interval=0.2)
        assert set(cleanup_threads()) == before, "the thread started before the store was used"
        store.load(new_key())  # first use
    else:
        store = make_store("sqlite", cleanup_interval=0.2)  # creating the table is not a use
        assert set(cleanup_threads()) == before, "the thread started before the store was used"
        store.load(new_key())  # first use
    assert isinstance(store, SQLStore)
    started = set(cleanup_threads()) - before
    assert len(started) == 1, "first use should start exactly one cleanup thread"
    (thread,) = started
    assert thread.daemon

    live = create_live(store, 3)
    insert_expired(store, 40)
    assert wait_for(lambda: row_count(store) == 3), "the cleanup thread did not remove expired rows"
    assert_live(store, live)
    assert wait_for(lambda: any(r.getMessage() == "Cleaned up 40 expired sessions" for r in cleaned_messages(caplog)))
    assert any(r.threadName == THREAD_NAME for r in cleaned_messages(caplog))

    # more use does not start more threads
    store.load(new_key())
    assert set(cleanup_threads()) - before == {thread}

    store.close()
    assert not thread.is_alive(), "close() left the cleanup thread running"
    with pytest.raises(StoreError):
        store.load(new_key())


@pytest.mark.parametrize("kind", SQL_KINDS)
def test_no_cleanup_thread_when_interval_is_zero(make_store: Callable[..., SessionStore], kind: str) -> None:
    before = set(cleanup_threads())
    store = make_store(kind, cleanup_interval=0)
    store.create(new_key(), {"a": "1"}, TTL)
    assert store.load(new_key()) is None
    assert set(cleanup_threads()) == before


def test_cleanup_thread_survives_a_failing_cleanup(
    make_store: Callable[..., SessionStore], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="wsgisession")
    before = set(cleanup_threads())
    store = make_store("postgres", cleanup_interval=0.2)
    assert isinstance(store, PostgresStore)
    store.load(new_key())  # first use starts the thread
    (thread,) = set(cleanup_threads()) - before
    sql(store, f"DROP TABLE {store.table}")
    assert wait_for(lambda: any(r.getMessage().startswith("Session cleanup failed") for r in caplog.records)), (
        "a failing cleanup was not logged"
    )
    failure = next(r for r in caplog.records if r.getMessage().startswith("Session cleanup failed"))
    assert failure.levelno == logging.WARNING
    assert thread.is_alive(), "the cleanup thread died on an error"

    store.setup()
    insert_expired(store, 10)
    assert wait_for(lambda: row_count(store) == 0), "the thread stopped cleaning after an error"


# -- several processes cleaning one PostgreSQL table --------------------------------------

CLEANER = """
import sys
from wsgisession.stores.postgres import PostgresStore

store = PostgresStore(sys.argv[1], table=sys.argv[2], cleanup_interval=0, create_table=False, driver=sys.argv[3])
store.ping()
print("ready", flush=True)
for line in sys.stdin:
    if line.strip() != "go":
        break
    print(store.cleanup(), flush=True)
store.close()
"""


def read_line(proc: subprocess.Popen[str], timeout: float = 30.0) -> str:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    assert ready, "a cleaner process did not answer in time"
    return proc.stdout.readline().strip()


@pytest.fixture
def cleaners(make_store: Callable[..., SessionStore]) -> Iterator[tuple[PostgresStore, list[subprocess.Popen[str]]]]:
    store = make_store("postgres")
    assert isinstance(store, PostgresStore)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", CLEANER, store.dsn, store.table, store.driver.name],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    try:
        yield store, procs
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=10)
            for stream in (proc.stdin, proc.stdout, proc.stderr):
                if stream is not None:
                    stream.close()


@each_pg_driver
def test_two_processes_cleaning_one_table_remove_each_row_once(
    cleaners: tuple[PostgresStore, list[subprocess.Popen[str]]],
) -> None:
    store, procs = cleaners
    for proc in procs:
        assert read_line(proc) == "ready"
    live = create_live(store, 5)
    rounds, expired = 3, 3500
    for _ in range(rounds):
        insert_expired(store, expired)
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
        counts = [int(read_line(proc)) for proc in procs]
        assert sum(counts) == expired, f"the cleaners removed {counts} of {expired} expired rows"
        assert row_count(store) == 5
    assert_live(store, live)
    for proc in procs:
        assert proc.stdin is not None
        proc.stdin.write("quit\n")
        proc.stdin.flush()
        assert proc.wait(timeout=20) == 0
        assert proc.stderr is not None
        assert proc.stderr.read() == ""


# -- forked children ----------------------------------------------------------------------


def run_in_child(body: Callable[[], dict[str, Any]], timeout: float = 30.0) -> tuple[int, dict[str, Any]]:
    """Fork; run ``body`` in the child and hand its result (or error) back; return (child pid, result)."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never return into pytest
        code = 1
        try:
            os.close(read_end)
            try:
                result = body()
                code = 0
            except BaseException as exc:  # reported to the parent
                result = {"error": repr(exc)}
            with os.fdopen(write_end, "w") as out:
                json.dump(result, out)
        finally:
            os._exit(code)
    os.close(write_end)
    return pid, {"read_end": read_end, "timeout": timeout}


def wait_child(pid: int, handle: dict[str, Any]) -> dict[str, Any]:
    deadline = time.monotonic() + handle["timeout"]
    status = None
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        time.sleep(0.02)
    else:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(handle["read_end"])
        pytest.fail("the forked child did not finish in time")
    with os.fdopen(handle["read_end"]) as result:
        text = result.read()
    data: dict[str, Any] = json.loads(text) if text else {"error": "the child wrote nothing"}
    assert "error" not in data, data["error"]
    assert os.waitstatus_to_exitcode(status) == 0
    return data


def test_a_lock_held_at_the_fork_does_not_hang_the_child() -> None:
    """gunicorn may fork while a thread holds a store's lock (here the lock of the failover store's
    view of the cache, taken when it fails): the child must not wait forever for it."""
    store = FailoverStore(MemoryStore(), MemoryStore(), probe_interval=0)
    health = store.cache_health
    health._lock.acquire()  # held at the fork, as by another thread of the parent
    try:
        pid, handle = run_in_child(lambda: (health.failed(), health.status())[1], 10)
    finally:
        health._lock.release()
    assert wait_child(pid, handle)["state"] == "down"


@pytest.mark.parametrize("kind", SQL_KINDS)
def test_forked_child_starts_its_own_thread_and_connections(make_store: Callable[..., SessionStore], kind: str) -> None:
    # The parent's thread runs rarely, so that the child's own thread is the one that cleans.
    before = set(cleanup_threads())
    store = make_store(kind, cleanup_interval=30)
    assert isinstance(store, SQLStore)
    parent_key = new_key()
    store.create(parent_key, {"from": '"parent"'}, TTL)
    assert len(set(cleanup_threads()) - before) == 1  # the parent's own thread

    def child() -> dict[str, Any]:
        result: dict[str, Any] = {"threads_before_use": len(cleanup_threads())}
        store._cleaner.interval = 0.2  # the child cleans often, the parent rarely
        record = store.load(parent_key)  # the child's first use
        result["parent_data"] = None if record is None else record.data
        threads = cleanup_threads()
        result["threads_after_use"] = len(threads)
        result["daemon"] = all(t.daemon for t in threads)
        key = new_key()
        store.create(key, {"n": "0"}, TTL)
        for n in range(1, 201):  # while the parent works on its own connections
            assert store.update(key, Changes(set={"n": json.dumps(n)}), TTL)
            loaded = store.load(key)
            assert loaded is not None and loaded.data == {"n": n}
        short = [new_key() for _ in range(10)]
        for k in short:
            store.create(k, {"a": "1"}, 0.05)
        marks = ",".join(["%s"] * len(short))

        def short_ones_gone() -> bool:
            return int(sql(store, f"SELECT count(*) FROM {store.table} WHERE id IN ({marks})", tuple(short))[0][0]) == 0

        result["own_thread_cleaned"] = wait_for(short_ones_gone, timeout=10)
        store.close()
        result["thread_stopped"] = not any(t.is_alive() for t in threads)
        gc.collect()
        return result

    pid, handle = run_in_child(child)
    # the parent keeps using its store while the child uses its copy
    for n in range(200):
        assert store.update(parent_key, Changes(set={"n": json.dumps(n)}), TTL)
        loaded = store.load(parent_key)
        assert loaded is not None and loaded.data == {"from": "parent", "n": n}
    result = wait_child(pid, handle)

    assert result["threads_before_use"] == 0
    assert result["parent_data"]["from"] == "parent"  # (and perhaps an "n" the parent wrote meanwhile)
    assert result["threads_after_use"] == 1, "the forked child did not start its own cleanup thread"
    assert result["daemon"]
    assert result["own_thread_cleaned"], "the child's cleanup thread did not remove expired rows"
    assert result["thread_stopped"]

    # The child closed its store and exited: the parent's connections still work.
    record = store.load(parent_key)
    assert record is not None and record.data == {"from": "parent", "n": 199}
    assert store.update(parent_key, Changes(set={"after": "true"}), TTL)
    assert store.touch(parent_key, TTL)
    assert len(set(cleanup_threads()) - before) == 1, "the parent's cleanup thread is gone"


def test_a_periodic_task_that_raises_is_logged_and_runs_again(caplog: pytest.LogCaptureFixture) -> None:
    """A bug or a driver's surprise in the probe or the cleanup must not end its thread for good."""
    runs: list[int] = []

    def task() -> None:
        runs.append(1)
        if len(runs) == 1:
            raise KeyError("run_id")

    periodic = Periodic("test-periodic", 0.01, task)
    periodic.start()
    try:
        deadline = time.monotonic() + 5
        while len(runs) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        periodic.stop()
    assert len(runs) >= 3
    assert any("the periodic task failed" in r.getMessage() for r in caplog.records)
