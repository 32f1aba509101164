"""A user's sessions in the SQL stores: PostgreSQL, SQLite and connect-pg-simple's table (the express
format), on real servers. The store contract (users_contract.py), then what is particular to SQL: the
index an existing table gains at start-up, one statement per operation, the plans PostgreSQL picks,
"end all" racing a login, and Node.js documents PostgreSQL's json operators cannot read.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import webtest
from servers import SECRET, drop_table, pg_sql, require_postgres, unique
from users_contract import *  # noqa: F403 - the contract's tests, run here on the SQL stores
from users_contract import binding, bound, keys_of

from wsgisession import SessionMiddleware, SessionStore, SQLiteStore, StoreError
from wsgisession.core import SessionCore
from wsgisession.settings import Settings
from wsgisession.stores.base import USER_KEY, Changes
from wsgisession.stores.connect_pg import ConnectPgStore
from wsgisession.stores.express import ExpressDocument
from wsgisession.stores.postgres import PostgresStore

KINDS = ["postgres", "sqlite", "express"]
OTHERS = 20_000  # rows of other users around the one a test looks at


# -- stores -------------------------------------------------------------------------------------


class _CountingCursor:
    """A driver's cursor that notes each statement run through it."""

    def __init__(self, cur: Any, statements: list[str]) -> None:
        self._cur, self._statements = cur, statements

    def execute(self, query: Any, *args: Any, **kwargs: Any) -> Any:
        self._statements.append(query)
        return self._cur.execute(query, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._cur, name)


class Counted:
    """A store that notes every statement it sends: one round trip each on PostgreSQL (psycopg2 sends a
    PREPARE and its EXECUTE together; psycopg 3 pipelines a first run with its preparation), one call
    into the library on SQLite."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.statements: list[str] = []
        super().__init__(*args, **kwargs)

    def _connect(self) -> Any:
        conn = super()._connect()  # type: ignore[misc]
        if isinstance(conn, sqlite3.Connection):
            conn.set_trace_callback(self.statements.append)
        return conn

    @contextlib.contextmanager
    def _cursor(self, pooled: bool = True) -> Iterator[Any]:
        with super()._cursor(pooled) as cur:  # type: ignore[misc]
            yield cur if isinstance(cur, sqlite3.Cursor) else _CountingCursor(cur, self.statements)


class CountedPostgres(Counted, PostgresStore):
    pass


class CountedSQLite(Counted, SQLiteStore):
    pass


class CountedConnectPg(Counted, ConnectPgStore):
    pass


def express_store(url: str, table: str, counted: bool = False) -> ConnectPgStore:
    cls = CountedConnectPg if counted else ConnectPgStore
    return cls(url, document=ExpressDocument(3600), table=table, cleanup_interval=0)


@pytest.fixture
def build(tmp_path: Path) -> Iterator[Callable[..., Any]]:
    """Build a store of a kind on a private table (counting its statements if asked); dropped after."""
    made: list[tuple[SessionStore, Callable[[], None]]] = []

    def make(kind: str, counted: bool = False, table: str | None = None) -> Any:
        table = table or unique("users")
        if kind == "sqlite":
            cls = CountedSQLite if counted else SQLiteStore
            store: SessionStore = cls(str(tmp_path / "users.sqlite3"), table=table, cleanup_interval=0)
            made.append((store, lambda: None))
            return store
        url = require_postgres()
        if kind == "postgres":
            store = (CountedPostgres if counted else PostgresStore)(url, table=table, cleanup_interval=0)
        else:
            store = express_store(url, table, counted)
        made.append((store, lambda: drop_table(url, table)))
        return store

    yield make
    for store, cleanup in made:
        store.close()
        cleanup()


@pytest.fixture(params=KINDS)
def store(request: pytest.FixtureRequest, make_store: Callable[..., SessionStore]) -> Iterator[SessionStore]:
    if request.param != "express":
        yield make_store(request.param)
        return
    url, table = require_postgres(), unique("session")
    express = express_store(url, table)
    yield express
    express.close()
    drop_table(url, table)


def fill_with_others(store: Any, rows: int = OTHERS) -> None:
    """``rows`` live sessions of 7,000 other users, written in one statement."""
    other = "json_build_object('id', 'other' || mod(g, 7000), 'login', 1, 'seen', 1)"
    user = f"'{USER_KEY}', {other}"
    expires = "now() + (60 + mod(g, 3600)) * interval '1 second'"
    if isinstance(store, SQLiteStore):
        conn = sqlite3.connect(store.path)
        with conn:
            conn.executemany(
                f"INSERT INTO {store.table} VALUES (?, ?, ?)",
                [(f"other{g}", json.dumps({USER_KEY: {"id": f"other{g % 7000}", "login": 1, "seen": 1}}),
                  time.time() + 60 + g % 3600) for g in range(rows)],
            )  # fmt: skip
        conn.close()
    elif isinstance(store, ConnectPgStore):
        document = f"json_build_object('cookie', json_build_object('path', '/'), {user})"
        pg_sql(store.dsn, f"INSERT INTO {store.table} SELECT 'other' || g, {document}, {expires}, "
                          f"{other}::jsonb FROM generate_series(1, {rows}) g")  # fmt: skip
    else:
        pg_sql(store.dsn, f"INSERT INTO {store.table} SELECT 'other' || g, json_build_object({user})::jsonb, "
                          f"{expires} FROM generate_series(1, {rows}) g")  # fmt: skip


def index_of(store: Any) -> str:
    name = store.table.rsplit(".", 1)[-1]
    return f"IDX_{name}_user" if isinstance(store, ConnectPgStore) else f"{name}_user"


# -- an existing table gains the index at start-up --------------------------------------------------


def test_a_postgres_table_of_the_previous_schema_gains_the_index_at_start_up(
    make_store: Callable[..., SessionStore],
) -> None:
    url, table = require_postgres(), unique("sess")
    pg_sql(url, f"CREATE TABLE {table} (id TEXT PRIMARY KEY, data JSONB NOT NULL, expires_at TIMESTAMPTZ NOT NULL); "
                f"CREATE INDEX {table}_expires_at ON {table} (expires_at); "
                f"CREATE TABLE {table}_stale (mark BIGSERIAL PRIMARY KEY, key TEXT NOT NULL)")  # fmt: skip
    documents = {"k1": f'{{"{USER_KEY}": {binding("ann")}}}', "k2": f'{{"{USER_KEY}": {binding("ann")}}}',
                 "k3": f'{{"{USER_KEY}": {binding("bob")}}}', "k4": '{"cart": []}'}  # fmt: skip
    for key, document in documents.items():
        pg_sql(url, f"INSERT INTO {table} VALUES (%s, %s, now() + interval '1 hour')", (key, document))
    store = make_store("postgres", table=table)  # setup() runs at start-up
    indexes = pg_sql(url, "SELECT indexname FROM pg_indexes WHERE tablename = %s", (table,))
    assert (f"{table}_user",) in indexes
    assert keys_of(store, "ann") == {"k1", "k2"} and keys_of(store, "bob") == {"k3"}
    assert store.trim_user("ann", 1) in (["k1"], ["k2"])


def test_a_sqlite_table_of_the_previous_schema_gains_the_index_even_holding_text_that_is_not_json(
    tmp_path: Path, make_store: Callable[..., SessionStore]
) -> None:
    """Another program may have stored anything in the TEXT column: neither the index nor a write fails."""
    conn = sqlite3.connect(str(tmp_path / "sessions.sqlite3"))
    conn.executescript(
        "CREATE TABLE wsgisession (id TEXT PRIMARY KEY, data TEXT NOT NULL, expires_at REAL NOT NULL) WITHOUT ROWID;"
        "CREATE INDEX wsgisession_expires_at ON wsgisession (expires_at);"
        "CREATE TABLE wsgisession_stale (mark INTEGER PRIMARY KEY, key TEXT NOT NULL);"
    )
    later = time.time() + 3600
    rows = [("k1", json.dumps({USER_KEY: json.loads(binding("ann"))})), ("broken", "not json"), ("list", "[1, 2]")]
    with conn:
        conn.executemany("INSERT INTO wsgisession VALUES (?, ?, ?)", [(k, v, later) for k, v in rows])
    store = make_store("sqlite")
    assert conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'wsgisession_user'").fetchone() == (1,)
    with conn:
        conn.execute("UPDATE wsgisession SET data = '{not json' WHERE id = 'k1'")  # a write the index lets through
        conn.execute("INSERT INTO wsgisession VALUES ('k2', ?, ?)", (json.dumps({USER_KEY: {"id": "ann"}}), later))
    conn.close()
    assert keys_of(store, "ann") == {"k2"}
    assert store.load("broken") is None and store.load("k1") is None


# connect-pg-simple's table.sql, under names of this test's own.
CONNECT_PG_SIMPLE_DDL = """
CREATE TABLE "{t}" ("sid" varchar NOT NULL COLLATE "default", "sess" json NOT NULL, "expire" timestamp(6) NOT NULL)
WITH (OIDS=FALSE);
ALTER TABLE "{t}" ADD CONSTRAINT "{t}_pkey" PRIMARY KEY ("sid") NOT DEFERRABLE INITIALLY IMMEDIATE;
CREATE INDEX "IDX_{t}_expire" ON "{t}" ("expire");
"""

# The upsert connect-pg-simple runs for each save of a session (its index.js).
CONNECT_PG_SIMPLE_SET = (
    'INSERT INTO "{t}" (sess, expire, sid) SELECT %s, to_timestamp(%s), %s '
    "ON CONFLICT (sid) DO UPDATE SET sess=%s, expire=to_timestamp(%s) RETURNING sid"
)

# What JSON.stringify writes for strings a Node.js application may keep in a session, and PostgreSQL's
# json operators refuse ("unsupported Unicode escape sequence", "low surrogate must follow a high").
NODE_DOCUMENTS = {
    "a NUL": '{"cookie":{"path":"/"},"user":"nul\\u0000inside"}',
    "a lone surrogate": '{"cookie":{"path":"/"},"user":"half \\ud800"}',
}


def node_saves(url: str, table: str, sid: str, document: str) -> None:
    """Save a session as connect-pg-simple does."""
    expires = time.time() + 3600
    pg_sql(url, CONNECT_PG_SIMPLE_SET.format(t=table), (document, expires, sid, document, expires))


def test_connect_pg_simples_table_gains_a_column_and_its_index_and_node_still_saves_anything(
    build: Callable[..., Any],
) -> None:
    """An index on ``sess -> 'wsgisession.user'`` would make connect-pg-simple's saves of these documents
    fail, and its creation fail on a table holding one: the express store indexes a copy of the binding
    in a column of its own instead."""
    url, table = require_postgres(), unique("session")
    pg_sql(url, CONNECT_PG_SIMPLE_DDL.format(t=table))
    for case, document in NODE_DOCUMENTS.items():
        node_saves(url, table, f"before {case}", document)
    store = build("express", table=table)  # start-up: the column and its index are added
    assert (f"IDX_{table}_user",) in pg_sql(url, "SELECT indexname FROM pg_indexes WHERE tablename = %s", (table,))
    for case, document in NODE_DOCUMENTS.items():
        node_saves(url, table, f"after {case}", document)
        node_saves(url, table, f"before {case}", document)
    build("express", table=table)  # a second start-up changes nothing
    # A session Python binds, holding such a string, is listed, unbound, bound and ended like any other
    # (its updates merge in Python: jsonb refuses the document).
    key = secrets.token_hex(16)
    store.create(key, {"user": json.dumps("nul\u0000inside half \ud800"), USER_KEY: binding("ann")}, 600)
    assert keys_of(store, "ann") == {key}
    assert store.update(key, Changes({}, (USER_KEY,)), 600)
    assert keys_of(store, "ann") == set()
    assert store.update(key, Changes({USER_KEY: binding("bob")}), 600)
    assert keys_of(store, "bob") == {key}
    assert store.trim_user("bob", 0) == [key]
    assert pg_sql(url, f"SELECT count(*) FROM {table}") == [(4,)]


def test_a_save_by_node_keeps_the_binding_python_made(build: Callable[..., Any]) -> None:
    """Node.js rewrites the whole document at each save; connect-pg-simple's upsert leaves the column be."""
    store = build("express")
    key = bound(store, "ann")
    document = pg_sql(store.dsn, f"SELECT sess::text FROM {store.table} WHERE sid = %s", (key,))[0][0]
    node_saves(store.dsn, store.table, key, json.dumps({**json.loads(document), "count": 1}))
    assert keys_of(store, "ann") == {key}
    assert store.update(key, Changes({}, (USER_KEY,)), 600)  # unbound by Python: the column follows
    assert keys_of(store, "ann") == set()


@pytest.mark.parametrize("kind", KINDS)
def test_a_binding_without_times_is_the_least_recently_used(kind: str, build: Callable[..., Any]) -> None:
    """As base.recency ranks it (PostgreSQL sorts NULLs first in a descending order unless told)."""
    store = build(kind)
    user = secrets.token_hex(8)
    timeless = secrets.token_hex(32)
    store.create(timeless, {USER_KEY: json.dumps({"id": user})}, 900)
    seen = bound(store, user, ttl=600)
    assert store.trim_user(user, 1) == [timeless]
    assert keys_of(store, user) == {seen}


# -- one statement each ------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_listing_trimming_and_ending_are_one_statement_each(kind: str, build: Callable[..., Any]) -> None:
    store = build(kind, counted=True)
    user = secrets.token_hex(8)
    keys = [bound(store, user, ttl=100 + n) for n in range(5)]
    statements = store.statements

    def count(operation: Callable[[], Any]) -> int:
        statements.clear()
        operation()
        return len(statements)

    # SQLite has no round trips: a merge there, and a trim, is a SELECT and a write in one transaction.
    in_one_transaction = 4 if kind == "sqlite" else 1
    assert count(lambda: store.load(keys[0])) == 1  # a logged-in read: nothing more
    assert count(lambda: bound(store, user)) == 1  # a login's write
    assert count(lambda: store.update(keys[0], Changes({USER_KEY: binding(user)}), 600)) == in_one_transaction
    assert count(lambda: store.user_sessions(user)) == 1
    assert count(lambda: store.trim_user(user, 4)) == in_one_transaction
    assert len(store.user_sessions(user)) == 4
    assert count(lambda: store.delete_many(keys)) == 1
    assert count(lambda: store.delete_many([])) == 0


@pytest.mark.parametrize("kind", KINDS)
def test_a_long_list_is_ended_in_one_statement_on_postgresql_in_batches_of_500_on_sqlite(
    kind: str, build: Callable[..., Any]
) -> None:
    store = build(kind, counted=True)
    user = secrets.token_hex(8)
    keys = [bound(store, user) for _ in range(1001)]
    store.statements.clear()
    store.delete_many(keys)
    assert len(store.statements) == (3 if kind == "sqlite" else 1)  # SQLite's oldest limit: 999 parameters
    assert store.user_sessions(user) == []


# -- plans -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("analyzed", [False, True], ids=["fresh", "analyzed"])
def test_listing_and_trimming_use_the_index_among_many_users(
    kind: str, analyzed: bool, build: Callable[..., Any]
) -> None:
    """Before ANALYZE has seen the table (just after it gained the index, say) and after."""
    store = build(kind)
    fill_with_others(store)
    user = secrets.token_hex(8)
    mine = {bound(store, user) for _ in range(3)}
    plans = []
    if isinstance(store, SQLiteStore):
        conn = sqlite3.connect(store.path)
        if analyzed:
            conn.execute("ANALYZE")
        for sql, params in [(store._sql_user_sessions, (user,)),
                            (store._sql_beyond, (user, time.time(), None, 2))]:  # fmt: skip
            plans.append(str(conn.execute(f"EXPLAIN QUERY PLAN {sql}", params).fetchall()))
        conn.close()
    else:
        if analyzed:
            pg_sql(store.dsn, f"ANALYZE {store.table}")
        for sql, params in [(store._sql_user_sessions, (user,)),
                            (store._sql_trim_user, (user, time.time(), None, 2))]:  # fmt: skip
            plans.append(str(pg_sql(store.dsn, f"EXPLAIN {sql}", params)))
    full_scan = "SCAN " if isinstance(store, SQLiteStore) else "Seq Scan"
    for plan in plans:
        assert index_of(store) in plan and full_scan not in plan, plan
    assert keys_of(store, user) == mine
    assert len(store.trim_user(user, 1)) == 2


# -- retries -------------------------------------------------------------------------------------


def test_a_listing_is_retried_once_on_a_lost_connection_a_trim_and_a_deletion_are_not(
    build: Callable[..., Any],
) -> None:
    store = build("postgres", counted=True)
    user = secrets.token_hex(8)
    keys = {bound(store, user) for _ in range(3)}

    def server_closes_the_pooled_connection() -> None:
        store.ping()  # a connection in the pool
        # every one of the store's: psycopg_pool also opens some of its own accord, never lent yet
        pg_sql(store.dsn, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                          "WHERE application_name = 'wsgisession' AND pid <> pg_backend_pid()")  # fmt: skip

    server_closes_the_pooled_connection()
    assert keys_of(store, user) == keys
    server_closes_the_pooled_connection()
    with pytest.raises(StoreError):
        store.trim_user(user, 0)
    server_closes_the_pooled_connection()
    with pytest.raises(StoreError):
        store.delete_many(sorted(keys))
    assert keys_of(store, user) == keys


# -- races ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_end_all_ends_every_session_that_existed_while_the_user_logs_in_elsewhere(
    kind: str, build: Callable[..., Any]
) -> None:
    """One thread logs the user in again and again; another ends all their sessions, five times over.
    Each time, every session created before the end began is gone after it; nothing fails."""
    store = build(kind)
    users = SessionCore(Settings.load({}, secret=SECRET), store).users
    user = secrets.token_hex(8)
    created: list[str] = []
    errors: list[BaseException] = []
    stop = threading.Event()

    def log_in_again_and_again() -> None:
        try:
            while not stop.is_set():
                created.append(bound(store, user))  # appended once written
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=log_in_again_and_again)
    thread.start()
    ended = 0
    try:
        for _ in range(5):
            time.sleep(0.05)
            existing = list(created)
            ended += users.end_all(user)
            assert existing and all(store.load(key) is None for key in existing)
    finally:
        stop.set()
        thread.join()
    assert not errors
    assert ended + len(store.user_sessions(user)) == len(created)


# -- through the middleware ------------------------------------------------------------------------------


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
    """/login?user=U, /whoami, /devices, /others (log out everywhere else)."""
    session, users, route = environ["session"], environ["test.users"], environ["PATH_INFO"]
    body: Any = None
    if route == "/login":
        session.login(environ["QUERY_STRING"].removeprefix("user="))
    elif route == "/whoami":
        body = session.user_id
    elif route == "/devices":
        body = [device.current for device in users.list(session.user_id, current=session)]
    elif route == "/others":
        body = users.end_all(session.user_id, keep=session)
    start_response("200 OK", [("Content-Type", "application/json")])
    return [json.dumps(body).encode()]


@pytest.mark.parametrize("kind", KINDS)
def test_log_out_everywhere_else_through_the_middleware(kind: str, build: Callable[..., Any]) -> None:
    store = build(kind)
    mw = SessionMiddleware(app, store, secret=SECRET, format="express" if kind == "express" else None)
    laptop, phone, tablet = (webtest.TestApp(mw, extra_environ={"test.users": mw.users}) for _ in range(3))
    for device in (laptop, phone, tablet):
        device.get("/login?user=ann")
    assert sorted(laptop.get("/devices").json) == [False, False, True]
    assert laptop.get("/others").json == 2
    assert [device.get("/whoami").json for device in (laptop, phone, tablet)] == ["ann", None, None]
    assert laptop.get("/devices").json == [True]
