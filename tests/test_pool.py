"""The SQL stores' connection pool: bounded, shared by threads, and never lending a broken connection."""

from __future__ import annotations

import threading
import time

import pytest
from pg_server import PostgresServer
from servers import running, unique

from wsgisession.stores.base import StoreError
from wsgisession.stores.pool import Pool
from wsgisession.stores.postgres import PostgresStore


class Connection:
    """Stands in for a DB-API connection: the pool only opens, lends and closes them."""

    def __init__(self, number: int) -> None:
        self.number = number
        self.closed = False

    def close(self) -> None:
        self.closed = True


class Opened:
    """The ``connect`` a pool is given, recording what it opened."""

    def __init__(self) -> None:
        self.connections: list[Connection] = []
        self.lock = threading.Lock()

    def __call__(self) -> Connection:
        with self.lock:
            conn = Connection(len(self.connections))
            self.connections.append(conn)
            return conn


def test_threads_share_at_most_size_connections_and_all_get_one() -> None:
    opened = Opened()
    pool = Pool(opened, size=3, timeout=10)
    lent_at_once, peak, errors = [0], [0], []
    lock = threading.Lock()
    start = threading.Barrier(12)

    def work() -> None:
        try:
            start.wait()
            for _ in range(200):
                conn = pool.acquire()
                with lock:
                    lent_at_once[0] += 1
                    peak[0] = max(peak[0], lent_at_once[0])
                time.sleep(0.0001)
                with lock:
                    lent_at_once[0] -= 1
                pool.release(conn)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors, errors
    assert len(opened.connections) <= 3
    assert peak[0] <= 3
    assert not any(conn.closed for conn in opened.connections)


def test_one_thread_reuses_one_connection() -> None:
    opened = Opened()
    pool = Pool(opened, size=8, timeout=1)
    for _ in range(50):
        pool.release(pool.acquire())
    assert len(opened.connections) == 1


def test_a_waiter_gets_the_connection_another_thread_returns() -> None:
    pool = Pool(Opened(), size=1, timeout=10)
    first = pool.acquire()
    got: list[Connection] = []
    waiter = threading.Thread(target=lambda: got.append(pool.acquire()))
    waiter.start()
    time.sleep(0.1)
    assert not got  # still waiting: the one connection is out
    pool.release(first)
    waiter.join(10)
    assert got == [first]


def test_no_free_connection_within_the_timeout_is_a_store_error() -> None:
    pool = Pool(Opened(), size=2, timeout=0.2)
    held = [pool.acquire(), pool.acquire()]
    started = time.monotonic()
    with pytest.raises(StoreError, match=r"no free database connection within 0\.2 s"):
        pool.acquire()
    assert time.monotonic() - started >= 0.2
    pool.release(held.pop())
    assert pool.acquire() is not None  # and it recovers once one comes back


def test_a_discarded_connection_is_closed_never_lent_again_and_frees_its_place() -> None:
    opened = Opened()
    pool = Pool(opened, size=1, timeout=0.5)
    broken = pool.acquire()
    pool.discard(broken)
    assert broken.closed
    fresh = pool.acquire()  # within the bound: the broken one no longer counts
    assert fresh is not broken and not fresh.closed


def test_a_failed_connect_frees_its_place() -> None:
    attempts = []

    def connect() -> Connection:
        attempts.append(1)
        if len(attempts) == 1:
            raise OSError("server down")
        return Connection(len(attempts))

    pool = Pool(connect, size=1, timeout=0.5)
    with pytest.raises(OSError):
        pool.acquire()
    assert pool.acquire() is not None


def test_connections_returned_after_close_are_closed() -> None:
    opened = Opened()
    pool = Pool(opened, size=2, timeout=0.5)
    idle, lent = pool.acquire(), pool.acquire()
    pool.release(idle)
    pool.close()
    assert idle.closed
    pool.release(lent)
    assert lent.closed


def test_close_wakes_a_waiter_at_once_with_a_store_error() -> None:
    pool = Pool(Opened(), size=1, timeout=10)
    pool.acquire()
    failed: list[BaseException] = []

    def wait() -> None:
        try:
            pool.acquire()
        except StoreError as exc:
            failed.append(exc)

    waiter = threading.Thread(target=wait)
    waiter.start()
    time.sleep(0.1)
    started = time.monotonic()
    pool.close()
    waiter.join(5)
    assert failed and "closed" in str(failed[0])
    assert time.monotonic() - started < 2  # not the 10 s timeout


def test_a_connection_whose_close_is_interrupted_still_frees_its_place() -> None:
    class Interrupted(Connection):
        def close(self) -> None:
            raise KeyboardInterrupt

    pool = Pool(lambda: Interrupted(0), size=1, timeout=0.5)
    conn = pool.acquire()
    with pytest.raises(KeyboardInterrupt):
        pool.discard(conn)
    assert pool.acquire() is not None  # the bound is not left one short


def test_a_restarted_postgres_costs_one_failed_write_and_no_failed_read() -> None:
    """PostgreSQL restarts: every pooled connection is dead. The first statement finds out, and the
    idle connections are dropped with it, so the next statements work at once; a read that found
    out is repeated on a new connection (a write is not: it may have been applied)."""
    with running(PostgresServer()) as server:
        store = PostgresStore(server.url, table=unique("pool"), cleanup_interval=0, pool_size=4)
        try:
            fill_the_pool(store, 4)
            server.stop()
            server.start()
            failed = 0
            for _ in range(4):
                try:
                    store.delete("k")
                except StoreError:
                    failed += 1
            assert failed == 1
            fill_the_pool(store, 4)
            server.stop()
            server.start()
            assert [store.load("k") for _ in range(4)] == [None] * 4  # none of them failed
        finally:
            store.close()


def fill_the_pool(store: PostgresStore, connections: int) -> None:
    """Have ``connections`` statements run at once, so that as many connections wait in the pool after."""
    barrier = threading.Barrier(connections)
    errors: list[BaseException] = []

    def hold_a_connection() -> None:
        try:
            with store._cursor() as cur:
                barrier.wait(5)
                cur.execute("SELECT 1")
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=hold_a_connection) for _ in range(connections)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert errors == [] and not any(thread.is_alive() for thread in threads), errors
