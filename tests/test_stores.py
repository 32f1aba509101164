"""The store contract, run against every store (memory, SQLite, PostgreSQL, Redis) on real servers."""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import pytest
import redis
from servers import each_pg_driver, free_port, pg_sql

from wsgisession import MemoryStore, SessionStore, SQLiteStore, StoreError
from wsgisession.stores import Changes
from wsgisession.stores.base import CacheStore, DurableStore
from wsgisession.stores.postgres import PostgresStore
from wsgisession.stores.redis import RedisStore

TTL = 60.0


def enc(value: Any) -> str:
    """Encode a value the way the session does before it reaches a store."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def encode_all(values: dict[str, Any]) -> dict[str, str]:
    return {k: enc(v) for k, v in values.items()}


def new_key() -> str:
    """A store key shaped like the real ones (a sha256 hex digest)."""
    return hashlib.sha256(uuid.uuid4().bytes).hexdigest()


def kind_of(store: SessionStore) -> str:
    if isinstance(store, MemoryStore):
        return "memory"
    if isinstance(store, SQLiteStore):
        return "sqlite"
    if isinstance(store, PostgresStore):
        return "postgres"
    if isinstance(store, RedisStore):
        return "redis"
    raise TypeError(store)


def stored_anything(store: SessionStore, key: str) -> bool:
    """Whether the backend still holds anything under ``key`` (expired or not)."""
    if isinstance(store, MemoryStore):
        return key in store._sessions
    if isinstance(store, SQLiteStore):
        conn = sqlite3.connect(store.path)
        try:
            return bool(conn.execute(f"SELECT count(*) FROM {store.table} WHERE id = ?", (key,)).fetchone()[0] > 0)
        finally:
            conn.close()
    if isinstance(store, PostgresStore):
        return bool(pg_sql(store.dsn, f"SELECT count(*) FROM {store.table} WHERE id = %s", (key,))[0][0] > 0)
    assert isinstance(store, RedisStore)
    return bool(store.client.exists(store.prefix + key))


def write_raw_sql(store: SessionStore, key: str, data: str, expires: float) -> None:
    """Insert a row directly with SQL, bypassing the store."""
    if isinstance(store, SQLiteStore):
        conn = sqlite3.connect(store.path, isolation_level=None)
        try:
            conn.execute(f"INSERT INTO {store.table} (id, data, expires_at) VALUES (?, ?, ?)", (key, data, expires))
        finally:
            conn.close()
    else:
        assert isinstance(store, PostgresStore)
        pg_sql(store.dsn, f"INSERT INTO {store.table} (id, data, expires_at) VALUES (%s, %s::jsonb, to_timestamp(%s))",
               (key, data, expires))  # fmt: skip


def malformed_writers(store: SessionStore) -> list[tuple[str, Callable[[str], None]]]:
    """Ways to put a broken record under a key directly in the store's backend, by kind."""
    kind = kind_of(store)
    expires = time.time() + TTL
    if kind == "memory":  # the store is its own backend: what create() was given is what it holds
        return [("value not JSON", lambda key: store.create(key, {"a": "not json", "b": "1"}, TTL))]
    if kind in ("sqlite", "postgres"):
        texts = ["[1, 2]", '"a string"', "null", "42", "true"]
        if kind == "sqlite":  # jsonb refuses text that is not JSON, so only SQLite can hold it
            texts += ["not json", '{"a": 1', ""]

        def row_with(text: str) -> Callable[[str], None]:
            return lambda key: write_raw_sql(store, key, text, expires)

        return [(f"data {text!r}", row_with(text)) for text in texts]
    assert isinstance(store, RedisStore)
    client, prefix = store.client, store.prefix

    def hash_with(fields: dict[Any, Any]) -> Callable[[str], None]:
        def write(key: str) -> None:
            client.hset(prefix + key, mapping=fields)
            client.pexpire(prefix + key, int(TTL * 1000))

        return write

    def string_key(key: str) -> None:
        client.set(prefix + key, '{"a": 1}', px=int(TTL * 1000))

    def list_key(key: str) -> None:
        client.rpush(prefix + key, "a", "b")
        client.pexpire(prefix + key, int(TTL * 1000))

    return [
        ("hash value not JSON", hash_with({"a": "not json", "b": "1"})),
        ("hash value truncated JSON", hash_with({"a": '{"x": 1'})),
        ("hash field not UTF-8", hash_with({b"\xff\xfe": "1"})),
        ("string key", string_key),
        ("list key", list_key),
    ]


# -- load, create, update ---------------------------------------------------------------


def test_load_missing_key_is_none(store: SessionStore) -> None:
    assert store.load(new_key()) is None


def test_create_then_load_returns_values_and_expiry(store: SessionStore) -> None:
    key = new_key()
    values = {"user": "alice", "n": 3, "flags": [True, False], "prefs": {"theme": "dark"}}
    before = time.time()
    store.create(key, encode_all(values), TTL)
    record = store.load(key)
    assert record is not None
    assert record.data == values
    assert before + TTL - 2 <= record.expires <= time.time() + TTL + 2
    # another key is not affected
    assert store.load(new_key()) is None


def test_update_merges_per_key(store: SessionStore) -> None:
    key = new_key()
    store.create(key, encode_all({"a": 1, "b": {"x": 1, "y": 2}, "c": [1, 2], "keep": "me"}), TTL)
    changed = store.update(
        key,
        Changes(set=encode_all({"b": {"z": 3}, "c": [], "new": None}), deleted=("a", "never-there")),
        TTL,
    )
    assert changed is True
    record = store.load(key)
    assert record is not None
    # nested values are replaced whole at their top-level key; untouched keys stay
    assert record.data == {"b": {"z": 3}, "c": [], "new": None, "keep": "me"}


def test_update_with_only_deletes_and_only_sets(store: SessionStore) -> None:
    key = new_key()
    store.create(key, encode_all({"a": 1, "b": 2, "c": 3}), TTL)
    assert store.update(key, Changes(set={}, deleted=("a",)), TTL) is True
    assert store.update(key, Changes(set=encode_all({"d": 4})), TTL) is True
    record = store.load(key)
    assert record is not None
    assert record.data == {"b": 2, "c": 3, "d": 4}


def test_update_of_thousands_of_keys_at_once(store: SessionStore) -> None:
    """More changed keys than one command takes at a time (Redis's script sends them in chunks)."""
    key = new_key()
    store.create(key, encode_all({f"old{i}": i for i in range(2500)}), TTL)
    deleted = tuple(f"old{i}" for i in range(1, 2500, 2))
    assert store.update(key, Changes(set=encode_all({f"new{i}": [i] for i in range(2345)}), deleted=deleted), TTL)
    record = store.load(key)
    assert record is not None
    assert record.data == {**{f"old{i}": i for i in range(0, 2500, 2)}, **{f"new{i}": [i] for i in range(2345)}}


def test_update_and_touch_extend_expiry(store: SessionStore) -> None:
    touched, updated = new_key(), new_key()
    store.create(touched, encode_all({"a": 1}), 1.0)
    store.create(updated, encode_all({"a": 1}), 1.0)
    assert store.touch(touched, TTL) is True
    assert store.update(updated, Changes(set=encode_all({"b": 2})), TTL) is True
    time.sleep(1.3)
    for key, data in ((touched, {"a": 1}), (updated, {"a": 1, "b": 2})):
        record = store.load(key)
        assert record is not None, "a session whose life was extended expired at its old time"
        assert record.data == data
        assert abs(record.expires - (time.time() + TTL)) < 2


def test_touch_can_shorten_expiry(store: SessionStore) -> None:
    key = new_key()
    store.create(key, encode_all({"a": 1}), TTL)
    assert store.touch(key, 0.3) is True
    time.sleep(0.5)
    assert store.load(key) is None


# -- missing, expired and deleted sessions are never brought back ------------------------


def test_update_and_touch_on_missing_key_do_not_create(store: SessionStore) -> None:
    key = new_key()
    assert store.update(key, Changes(set=encode_all({"a": 1})), TTL) is False
    assert store.touch(key, TTL) is False
    assert store.load(key) is None
    assert not stored_anything(store, key)


def test_update_and_touch_after_delete_do_not_resurrect(store: SessionStore) -> None:
    key = new_key()
    store.create(key, encode_all({"a": 1}), TTL)
    store.delete(key)
    assert store.load(key) is None
    assert store.update(key, Changes(set=encode_all({"b": 2})), TTL) is False
    assert store.touch(key, TTL) is False
    assert store.load(key) is None
    assert not stored_anything(store, key)


def test_delete_missing_key_is_fine(store: SessionStore) -> None:
    key = new_key()
    store.delete(key)
    store.delete(key)
    assert store.load(key) is None


def test_delete_removes_only_that_session(store: SessionStore) -> None:
    gone, kept = new_key(), new_key()
    store.create(gone, encode_all({"a": 1}), TTL)
    store.create(kept, encode_all({"a": 2}), TTL)
    store.delete(gone)
    assert store.load(gone) is None
    record = store.load(kept)
    assert record is not None and record.data == {"a": 2}


def test_expiry_is_honoured_on_read_and_expired_sessions_stay_dead(store: SessionStore) -> None:
    read, updated, touched, live = new_key(), new_key(), new_key(), new_key()
    for key in (read, updated, touched):
        store.create(key, encode_all({"a": 1}), 0.5)
    store.create(live, encode_all({"a": 1}), TTL)
    assert store.load(read) is not None
    time.sleep(0.8)
    assert store.load(read) is None
    assert store.update(updated, Changes(set=encode_all({"b": 2})), TTL) is False
    assert store.touch(touched, TTL) is False
    # neither call brought its session back
    assert store.load(updated) is None
    assert store.load(touched) is None
    record = store.load(live)
    assert record is not None and record.data == {"a": 1}


def test_cleanup_removes_expired_sessions(store: SessionStore) -> None:
    expired = [new_key() for _ in range(3)]
    live = new_key()
    for key in expired:
        store.create(key, encode_all({"a": 1}), 0.2)
    store.create(live, encode_all({"a": "live"}), TTL)
    time.sleep(0.4)
    removed = store.cleanup()
    if kind_of(store) == "redis":
        assert removed == 0  # Redis expires keys itself
    else:
        assert removed == 3
    for key in expired:
        assert not stored_anything(store, key)
    record = store.load(live)
    assert record is not None and record.data == {"a": "live"}
    assert store.cleanup() == 0


# -- values -------------------------------------------------------------------------------

ODD_VALUES: dict[str, Any] = {
    "unicode": 'héllo wörld ☃ 日本語 😀 \u2028\u2029 \t\n"quoted" back\\slash',
    "big_int": 2**70,
    "negative_big_int": -(2**64) - 1,
    "int_max": 2**63 - 1,
    "float": 1.5,
    "small_float": 0.1,
    "zero": 0,
    "true": True,
    "false": False,
    "null": None,
    "empty_string": "",
    "empty_list": [],
    "empty_dict": {},
    "nested": {"a": [1, {"b": [None, {"c": "d"}]}], "e": {}, "f": []},
    "list_of_mixed": [1, "two", 3.25, None, [], {}, {"k": [True]}],
    "ключ ☃": "unicode key",
    'key "with" quotes': "q",
    "": "empty key",
    "$dollar.dot": 1,
}


def test_odd_json_values_round_trip_through_create(store: SessionStore) -> None:
    key = new_key()
    store.create(key, encode_all(ODD_VALUES), TTL)
    record = store.load(key)
    assert record is not None
    assert record.data == ODD_VALUES
    for name, value in ODD_VALUES.items():
        assert type(record.data[name]) is type(value), name


def test_odd_json_values_round_trip_through_update(store: SessionStore) -> None:
    key = new_key()
    store.create(key, encode_all({"seed": 1}), TTL)
    assert store.update(key, Changes(set=encode_all(ODD_VALUES)), TTL) is True
    # a second merge must keep the values the first one wrote intact
    assert store.update(key, Changes(set=encode_all({"seed": 2})), TTL) is True
    record = store.load(key)
    assert record is not None
    assert record.data == {**ODD_VALUES, "seed": 2}
    for name, value in ODD_VALUES.items():
        assert type(record.data[name]) is type(value), name


@pytest.mark.parametrize("value", [1e16, 1e300, -2.5e-8, 123456789.125], ids=repr)
def test_floats_keep_their_value(store: SessionStore, value: float) -> None:
    """Floats read back as floats, except on PostgreSQL, whose jsonb keeps numbers as numeric:
    a whole float written in exponent form (1e16) reads back as an int (documented)."""
    key = new_key()
    store.create(key, {"f": enc(value)}, TTL)
    record = store.load(key)
    assert record is not None
    assert float(record.data["f"]) == value
    if kind_of(store) != "postgres" or value != int(value):
        assert type(record.data["f"]) is float


# -- malformed records --------------------------------------------------------------------


def test_malformed_records_load_as_none(store: SessionStore, caplog: pytest.LogCaptureFixture) -> None:
    good = new_key()
    store.create(good, encode_all({"ok": True}), TTL)
    for label, write in malformed_writers(store):
        key = new_key()
        write(key)
        try:
            result = store.load(key)
        except Exception as exc:  # report which record broke the store
            pytest.fail(f"load of a malformed record ({label}) raised {exc!r}")
        assert result is None, label
    # the store still works for well-formed sessions
    record = store.load(good)
    assert record is not None and record.data == {"ok": True}


# -- concurrency --------------------------------------------------------------------------


def run_threads(count: int, target: Callable[[int], None]) -> list[BaseException]:
    """Run ``target(i)`` in ``count`` threads started together; return what they raised."""
    errors: list[BaseException] = []
    barrier = threading.Barrier(count)

    def run(i: int) -> None:
        try:
            barrier.wait(timeout=10)
            target(i)
        except BaseException as exc:  # collected and asserted on
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
        assert not t.is_alive(), "a worker thread hung"
    return errors


def test_concurrent_updates_of_different_keys_lose_nothing(store: SessionStore) -> None:
    key = new_key()
    threads, rounds = 8, 50
    store.create(key, encode_all({"base": "untouched", "shared": {"n": 0}}), TTL)

    def work(i: int) -> None:
        for n in range(rounds):
            assert store.update(key, Changes(set={f"k{i}": enc({"n": n, "by": i})}), TTL) is True

    errors = run_threads(threads, work)
    assert errors == []
    record = store.load(key)
    assert record is not None
    expected = {"base": "untouched", "shared": {"n": 0}}
    expected.update({f"k{i}": {"n": rounds - 1, "by": i} for i in range(threads)})
    assert record.data == expected


def test_concurrent_sets_and_deletes_of_different_keys(store: SessionStore) -> None:
    key = new_key()
    threads, rounds = 4, 40
    store.create(key, encode_all({"base": 1}), TTL)

    def work(i: int) -> None:
        for n in range(rounds):
            if n % 2:
                changes = Changes(set={}, deleted=(f"k{i}",))
            else:
                changes = Changes(set={f"k{i}": enc(n), f"last{i}": enc(n)})
            assert store.update(key, changes, TTL) is True

    assert run_threads(threads, work) == []
    record = store.load(key)
    assert record is not None
    # every thread's last round deleted k{i}; last{i} holds its last set
    assert record.data == {"base": 1, **{f"last{i}": rounds - 2 for i in range(threads)}}


def test_delete_racing_with_updates_leaves_session_deleted(store: SessionStore) -> None:
    key = new_key()
    threads = 4
    store.create(key, encode_all({"a": 1}), TTL)
    successes = [0] * threads
    saw_gone = [False] * threads
    enough = threading.Event()

    def work(i: int) -> None:
        deadline = time.monotonic() + 15
        n = 0
        while time.monotonic() < deadline:
            n += 1
            if not store.update(key, Changes(set={f"k{i}": enc(n)}), TTL):
                saw_gone[i] = True
                # keep trying a little: none of these may bring the session back
                for m in range(5):
                    assert store.update(key, Changes(set={f"k{i}": enc(m)}), TTL) is False
                    assert store.touch(key, TTL) is False
                return
            successes[i] += 1
            if sum(successes) >= 40:
                enough.set()

    def deleter() -> None:
        assert enough.wait(timeout=20), "the updaters never got going"
        store.delete(key)

    killer = threading.Thread(target=deleter, daemon=True)
    killer.start()
    errors = run_threads(threads, work)
    killer.join(timeout=30)
    assert errors == []
    assert all(saw_gone), "an updater never noticed the session was deleted"
    assert store.load(key) is None
    assert not stored_anything(store, key)


# -- unreachable servers ------------------------------------------------------------------


def call_each(store: SessionStore) -> dict[str, Callable[[], Any]]:
    key = new_key()
    return {
        "load": lambda: store.load(key),
        "create": lambda: store.create(key, encode_all({"a": 1}), TTL),
        "update": lambda: store.update(key, Changes(set=encode_all({"a": 2})), TTL),
        "touch": lambda: store.touch(key, TTL),
        "delete": lambda: store.delete(key),
        "ping": store.ping,
    }


def assert_all_raise_store_error(store: SessionStore) -> None:
    for name, call in call_each(store).items():
        try:
            call()
        except StoreError:
            continue
        except Exception as exc:  # the wrong exception type is the failure
            pytest.fail(f"{name} on an unreachable server raised {exc!r}, not StoreError")
        pytest.fail(f"{name} on an unreachable server did not raise")


def test_redis_unreachable_raises_store_error() -> None:
    store = RedisStore(f"redis://127.0.0.1:{free_port()}/0", timeout=0.2)
    try:
        assert_all_raise_store_error(store)
    finally:
        store.close()


@each_pg_driver
def test_postgres_unreachable_raises_store_error(pg_driver: str) -> None:
    url = f"postgresql://postgres@127.0.0.1:{free_port()}/test"
    store = PostgresStore(url, table="unreachable_sessions", create_table=False, cleanup_interval=0, timeout=0.5,
                          pool_size=2, driver=pg_driver)  # fmt: skip
    try:
        assert_all_raise_store_error(store)
        # failures do not leak pool slots: the store keeps answering with StoreError, not hanging
        for _ in range(5):
            with pytest.raises(StoreError):
                store.load(new_key())
    finally:
        store.close()


def test_postgres_unreachable_with_create_table_raises_store_error() -> None:
    url = f"postgresql://postgres@127.0.0.1:{free_port()}/test"
    with pytest.raises(StoreError):
        PostgresStore(url, table="unreachable_sessions", cleanup_interval=0, timeout=0.5)


# -- PostgreSQL: prepared statements ---------------------------------------------------------


def prepared_here(store: PostgresStore) -> int:
    """How many of the store's statements are prepared on its pooled connection (a pool of one)."""
    with store._cursor() as cur:
        cur.execute("SELECT count(*) FROM pg_prepared_statements WHERE name LIKE 'wsgisession%'")
        return int(cur.fetchone()[0])


def forget_prepared(store: PostgresStore) -> None:
    """DEALLOCATE ALL on the store's pooled connection, behind the driver's back (as a pooler's reset,
    or a pooler moving the client to another server connection, would): psycopg 3 would otherwise see
    the command and forget its statements too."""
    with store._cursor() as cur:
        if store.driver.name == "psycopg":
            cur.connection.pgconn.exec_(b"DEALLOCATE ALL")
        else:
            cur.execute("DEALLOCATE ALL")


def every_statement(store: SessionStore, key: str) -> None:
    store.create(key, encode_all({"n": 1}), TTL)
    assert store.load(key) is not None
    assert store.update(key, Changes(set=encode_all({"n": 2})), TTL)
    assert store.touch(key, TTL)
    store.delete(key)
    assert store.load(key) is None


@each_pg_driver
def test_postgres_prepares_each_statement_a_request_runs_once_per_connection(make_store: Any) -> None:
    store = make_store("postgres", pool_size=1)
    every_statement(store, new_key())
    assert prepared_here(store) == 5  # load, create, update, touch, delete
    every_statement(store, new_key())
    assert prepared_here(store) == 5


@each_pg_driver
def test_postgres_runs_unprepared_once_the_server_forgot_its_statements(
    make_store: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """What a pooler's reset (DISCARD ALL) or a pooler that moves the connection does: no request fails."""
    store = make_store("postgres", pool_size=1)
    key = new_key()
    every_statement(store, key)
    forget_prepared(store)
    with caplog.at_level("INFO", logger="wsgisession"):
        every_statement(store, key)
        every_statement(store, new_key())
    assert len([r for r in caplog.records if "no longer prepared" in r.getMessage()]) == 1
    assert prepared_here(store) == 0


@each_pg_driver
def test_postgres_reads_on_after_a_column_changes_type_under_its_prepared_statement(
    make_store: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """ALTER TABLE while the application runs: the server refuses the prepared read ("cached plan
    must not change result type"); the store reads on, and prepares the read anew."""
    store = make_store("postgres", pool_size=1)
    key = new_key()
    store.create(key, encode_all({"user": "ann"}), TTL)
    assert store.load(key) is not None
    with store._cursor() as cur:
        cur.execute(f"ALTER TABLE {store.table} ALTER COLUMN data TYPE json")
    with caplog.at_level("INFO", logger="wsgisession"):
        for _ in range(2):
            record = store.load(key)
            assert record is not None and record.data == {"user": "ann"}
    # psycopg2 drops the read's statement alone; psycopg 3 all of them (DEALLOCATE ALL, which it follows)
    assert prepared_here(store) == (2 if store.driver.name == "psycopg2" else 1)
    assert not [r for r in caplog.records if "no longer prepared" in r.getMessage()]


def test_postgres_uses_a_statement_prepared_by_a_call_that_then_failed(make_store: Any) -> None:
    """psycopg2's PREPARE outlives an EXECUTE that failed in the same round trip: the next call finds
    the name taken, and runs the statement that holds it. (psycopg 3 prepares at the protocol level.)"""
    store = make_store("postgres", driver="psycopg2", pool_size=1)
    key = new_key()
    store.create(key, encode_all({"n": 1}), TTL)
    with store._cursor() as cur:
        cur.execute(store.driver._prepared[store._sql_load].prepare)  # on the one pooled connection
    record = store.load(key)
    assert record is not None and record.data == {"n": 1}
    assert prepared_here(store) == 2  # create's and the read's: still preparing


@each_pg_driver
def test_postgres_prepares_nothing_when_told_not_to(make_store: Any) -> None:
    store = make_store("postgres", prepare=False, pool_size=1)
    every_statement(store, new_key())
    assert prepared_here(store) == 0


def test_redis_updates_on_a_server_that_lost_its_scripts(make_store: Any) -> None:
    """A restarted or SCRIPT FLUSHed server no longer knows the update script by its digest."""
    store = make_store("redis")
    key = new_key()
    store.create(key, encode_all({"n": 1}), TTL)
    assert store.update(key, Changes(set=encode_all({"n": 2})), TTL)
    store.client.script_flush()
    assert store.update(key, Changes(set=encode_all({"n": 3})), TTL)
    assert store.touch(key, TTL)
    record = store.load(key)
    assert record is not None and record.data == {"n": 3}


# -- the roles behind a FailoverStore: a cache (memory, Redis) and a durable store (memory, SQL) ----------


@pytest.mark.parametrize("kind", ["memory", "sqlite", "postgres"])
def test_durable_store_keeps_stale_marks_in_order_and_drops_only_those_drained(
    make_store: Callable[..., SessionStore], kind: str
) -> None:
    store = make_store(kind)
    assert isinstance(store, DurableStore)
    assert store.stale(10) == [] and store.count_stale() == 0
    first, second = new_key(), new_key()
    store.mark_stale(first)
    store.mark_stale(second)
    store.mark_stale(first)  # marked again: a second write around the cache
    marks = store.stale(2)
    assert [key for _, key in marks] == [first, second], "oldest first, at most the limit"
    store.mark_stale(DurableStore.EVERY)  # made while the first two are dropped
    store.unmark_stale([mark for mark, _ in marks])
    assert [key for _, key in store.stale(10)] == [first, DurableStore.EVERY]
    store.unmark_stale([])
    assert store.count_stale() == 2


def test_stale_marks_are_shared_by_every_store_on_the_table(make_store: Callable[..., SessionStore]) -> None:
    """Two processes (two stores on one table): one marks, the other drains."""
    one = make_store("postgres")
    assert isinstance(one, PostgresStore)
    other = make_store("postgres", table=one.table)
    key = new_key()
    one.mark_stale(key)
    assert [k for _, k in other.stale(10)] == [key]  # type: ignore[attr-defined]
    other.unmark_stale([mark for mark, _ in other.stale(10)])  # type: ignore[attr-defined]
    assert one.count_stale() == 0


@pytest.mark.parametrize("kind", ["memory", "redis"])
def test_cache_store_names_its_server_and_clears_every_session(
    make_store: Callable[..., SessionStore], kind: str
) -> None:
    store = make_store(kind)
    assert isinstance(store, CacheStore)
    server = store.server_id()
    assert server and store.server_id() == server, "the same server, asked twice"
    keys = [new_key() for _ in range(5)]
    for key in keys:
        store.create(key, {"n": "1"}, TTL)
    store.delete_many(keys[:2])
    store.delete_many([])
    assert [store.load(key) is not None for key in keys] == [False, False, True, True, True]
    store.clear()
    assert all(store.load(key) is None for key in keys)


def test_redis_clear_leaves_keys_of_the_prefix_that_are_not_sessions(
    make_store: Callable[..., SessionStore], redis_url: str
) -> None:
    store = make_store("redis", prefix="t*[?]" + uuid.uuid4().hex + ":")  # glob characters, taken literally
    assert isinstance(store, RedisStore)
    neighbour = make_store("redis", prefix=store.prefix[:-1] + "x:")  # another app's prefix, sharing the start
    kept = store.prefix + "not-a-session"
    store.client.set(kept, "1")
    session, other = new_key(), new_key()
    store.create(session, {"n": "1"}, TTL)
    neighbour.create(other, {"n": "1"}, TTL)
    store.clear()
    assert store.load(session) is None
    assert neighbour.load(other) is not None
    assert store.client.get(kept) == b"1"
    store.client.delete(kept)


def test_redis_store_refuses_a_new_connection_to_another_server(
    make_store: Callable[..., SessionStore], private_redis: Any
) -> None:
    """After expect(), a connection redis-py reopens to a restarted server fails its command (the
    caller must learn of it before reading what may be older data); server_id() names the new one."""
    store = make_store("redis", url=private_redis.url)
    assert isinstance(store, RedisStore)
    first = store.server_id()
    store.expect(first)
    key = new_key()
    store.create(key, {"n": "1"}, TTL)
    private_redis.kill()
    private_redis.start()
    with pytest.raises(StoreError, match="another server"):
        store.load(key)
    second = store.server_id()
    assert second != first
    store.expect(second)
    assert store.load(key) is None  # the restarted server is empty, and may be read now


def test_redis_user_without_info_still_serves_a_failover(
    make_store: Callable[..., SessionStore], private_redis: Any
) -> None:
    """An ACL that refuses INFO: which server answers cannot be told (server_id() is ""), and new
    connections are not refused for it."""
    admin = redis.Redis.from_url(private_redis.url)
    admin.execute_command("ACL", "SETUSER", "noinfo", "on", ">noinfo-pw", "~*", "+@all", "-info")
    admin.close()
    url = private_redis.url.replace("redis://", "redis://noinfo:noinfo-pw@")
    store = make_store("redis", url=url)
    assert isinstance(store, RedisStore)
    assert store.server_id() == ""
    store.expect("")
    store.client.connection_pool.disconnect()  # the next command opens a new connection
    key = new_key()
    store.create(key, {"n": "1"}, TTL)
    assert store.load(key) is not None
