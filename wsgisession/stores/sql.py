"""What the SQL stores share: the table, the statements and the cleanup thread.

SQLite and PostgreSQL differ only in the pieces a subclass names: the parameter
marker, how a Unix time is written and read, the merge of per-key changes, how
several processes' cleaners share the expired rows, and the pool and driver.
"""

from __future__ import annotations

import contextlib
import re
import threading
from abc import abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from .base import (
    USER_KEY,
    Changes,
    Copy,
    DurableStore,
    Periodic,
    Record,
    StoreError,
    UserRecord,
    after_fork,
    bound_user,
    decode_record,
    holds,
    json_object,
    json_value,
    log,
    merged,
    now,
)
from .pool import Connections, Pool, close_quietly

# 57 characters at most: the table of stale marks adds "_stale", within PostgreSQL's 63.
TABLE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,56}(\.[A-Za-z_][A-Za-z0-9_]{0,56})?")
CLEANUP_BATCH = 1000
DELETE_BATCH = 500  # keys per DELETE of delete_many: within SQLite's oldest limit of 999 parameters


class ConnectionLost(StoreError):
    """The pooled connection had been closed by the server (which restarted, or dropped it)."""


class SQLStore(DurableStore):
    """Sessions as rows ``(id, data, expires_at)`` of one table, with a cleanup thread; behind a cache,
    the marks of its out-of-date copies in a second table, ``<table>_stale``."""

    param = "?"
    columns = ("id", "data", "expires_at")
    data_type = "TEXT"
    time_type = "REAL"
    mark_type = "INTEGER"  # an integer primary key that numbers rows as they are inserted
    table_options = ""
    #: what a query needs to skip all rows but the first ``n`` (PostgreSQL's OFFSET alone; SQLite needs a LIMIT)
    offset = "OFFSET"
    #: what puts NULLs last in a descending order (SQLite does by default)
    nulls_last = ""
    #: how a merge in Python opens its transaction, and what its read adds to lock the row
    rewrite_begin = "BEGIN"
    rewrite_lock = ""
    #: what lets several cleaners each take their own batch of expired rows (SQLite has one writer)
    skip_locked = ""
    #: the driver's errors, reported as :class:`StoreError`.
    errors: tuple[type[BaseException], ...] = ()

    def __init__(self, table: str, cleanup_interval: float, pool_size: int, timeout: float) -> None:
        if not TABLE_NAME.fullmatch(table):
            raise ValueError(f"invalid table name {table!r}: use letters, digits and _, optionally schema.table")
        self.table = table
        self._pool_size = pool_size
        self._timeout = timeout
        self._pool: Connections | None = None
        self._lock = threading.Lock()
        self._cleaner = Periodic("wsgisession-cleanup", cleanup_interval, self._clean)
        ts, p, t = self.timestamp(self.param), self.param, table
        i, d, e = self.columns
        # Expiry is checked in Python: a predicate on it costs the planner more than the check.
        self._sql_load = f"SELECT {d}, {self.epoch(e)} FROM {t} WHERE {i} = {p}"
        self._sql_create = self._create_sql()
        self._sql_add = self._copy_sql(self._sql_create)
        # Keyset pagination through the primary key, expiry checked in Python (as for a load): every
        # page an index range scan whatever the planner thinks of the expiry column.
        self._sql_scan = f"SELECT {i}, {d}, {self.epoch(e)} FROM {t} WHERE {i} > {p} ORDER BY {i} LIMIT {p}"
        self._sql_count = f"SELECT count(*) FROM {t} WHERE {e} > {ts}"
        self._sql_touch = f"UPDATE {t} SET {e} = {ts} WHERE {i} = {p} AND {e} > {ts}"
        self._sql_delete = f"DELETE FROM {t} WHERE {i} = {p}"
        self._sql_read_live = f"SELECT {d}, {self.epoch(e)} FROM {t} WHERE {i} = {p} AND {e} > {ts}{self.rewrite_lock}"
        self._sql_rewrite = self._rewrite_sql()
        batch = f"SELECT {i} FROM {t} WHERE {e} <= {ts} LIMIT {CLEANUP_BATCH}{self.skip_locked}"
        self._sql_cleanup = f"DELETE FROM {t} WHERE {i} IN ({batch})"
        self.stale_table = f"{t}_stale"
        self._sql_mark = f"INSERT INTO {self.stale_table} (key) VALUES ({p})"
        self._sql_stale = f"SELECT mark, key FROM {self.stale_table} ORDER BY mark LIMIT {p}"
        # A user's sessions, found through the index of the bound user's id (see schema()): expiry is
        # checked in Python, as for a load (with it, a planner without statistics yet also scans the
        # expiry index); those beyond a limit, ranked as base.recency ranks them, the one to keep first.
        bound = f"{self.bound_id(d)} = {p}"
        users = f"{bound} AND {e} > {ts}"
        self._sql_user_sessions = f"SELECT {i}, {self.binding(d)}, {self.epoch(e)} FROM {t} WHERE {bound}"
        seen, login, last = self.binding_field(d, "seen"), self.binding_field(d, "login"), self.nulls_last
        ranked = f"({i} = {p}) DESC, {seen} DESC{last}, {login} DESC{last}, {e} DESC"
        self._sql_beyond = f"SELECT {i} FROM {t} WHERE {users} ORDER BY {ranked} {self.offset} {p}"
        after_fork(self, SQLStore._after_fork)

    # -- dialect ---------------------------------------------------------------------

    @staticmethod
    @abstractmethod
    def timestamp(param: str) -> str:
        """SQL that turns a Unix-time parameter into the expiry column's type."""

    @staticmethod
    @abstractmethod
    def epoch(column: str) -> str:
        """SQL that reads the expiry column back as Unix seconds."""

    @abstractmethod
    def binding(self, column: str) -> str:
        """SQL for a bound row's binding (:data:`USER_KEY`'s value in the document in ``column``), as JSON."""

    @abstractmethod
    def bound_id(self, column: str) -> str:
        """SQL for the id of the user a row is bound to, NULL when none, that never fails: what the
        index of a user's sessions holds (an expression in parentheses)."""

    @abstractmethod
    def binding_field(self, column: str, field: str) -> str:
        """SQL for a field of a bound row's binding, in an order where a later time is greater."""

    def schema(self) -> list[str]:
        """The statements that create the table and its indexes if they are missing (a table made
        before the index of a user's sessions existed gains it when :meth:`setup` runs them)."""
        name, bound = self.table.rsplit(".", 1)[-1], self.bound_id("data")
        return [
            f"CREATE TABLE IF NOT EXISTS {self.table} (id TEXT PRIMARY KEY, data {self.data_type} NOT NULL, "
            f"expires_at {self.time_type} NOT NULL){self.table_options}",
            f"CREATE INDEX IF NOT EXISTS {name}_expires_at ON {self.table} (expires_at)",
            f"CREATE INDEX IF NOT EXISTS {name}_user ON {self.table} ({bound}) WHERE {bound} IS NOT NULL",
            f"CREATE TABLE IF NOT EXISTS {self.stale_table} (mark {self.mark_type} PRIMARY KEY, key TEXT NOT NULL)",
        ]

    @abstractmethod
    def _connect(self) -> Any:
        """Open one connection, in autocommit mode."""

    def _create_sql(self) -> str:
        """The upsert that writes a whole session."""
        p = self.param
        return self._upsert(f"VALUES ({p}, {p}, {self.timestamp(p)})")

    def _upsert(self, rows: str) -> str:
        """The INSERT of ``rows`` (a VALUES list or a SELECT, a value for each of :meth:`_create_params`')
        that replaces the row of the same key."""
        i, d, e = self.columns
        return (
            f"INSERT INTO {self.table} ({i}, {d}, {e}) {rows} "
            f"ON CONFLICT ({i}) DO UPDATE SET {d} = excluded.{d}, {e} = excluded.{e}"
        )

    def _copy_sql(self, upsert: str) -> str:
        """An upsert that stores copies: it replaces only an expired row (named by the table, which
        PostgreSQL requires: a bare column could also be excluded's). Its last parameter is now."""
        e = self.columns[2]
        return f"{upsert} WHERE {self.table}.{e} <= {self.timestamp(self.param)}"

    def _create_params(self, key: str, data: Mapping[str, str], expires: float) -> tuple[Any, ...]:
        return (key, self._document(data, expires), expires)

    def _rewrite_sql(self) -> str:
        """The update that writes back a session merged in Python."""
        i, d, e = self.columns
        p = self.param
        return f"UPDATE {self.table} SET {d} = {p}, {e} = {self.timestamp(p)} WHERE {i} = {p}"

    def _rewrite_params(self, key: str, data: Mapping[str, str], expires: float) -> tuple[Any, ...]:
        return (self._document(data, expires), expires, key)

    def _merge(self, cur: Any, key: str, changes: Changes, expires: float) -> bool:
        """Apply ``changes`` to a live row in one atomic step; False when there is none."""
        return self._rewrite(cur, key, changes, expires)

    def _rewrite(
        self, cur: Any, key: str, changes: Changes, expires: float | None, expected: Mapping[str, str] | None = None
    ) -> bool:
        """Merge by reading the row, applying ``changes`` in Python and writing it back, in one
        transaction that :attr:`rewrite_begin` and :attr:`rewrite_lock` make atomic; only if the row
        holds ``expected``, and with its expiry kept when ``expires`` is None."""
        with self._batch(cur):
            cur.execute(self.rewrite_begin)
            try:
                cur.execute(self._sql_read_live, (key, now()))
                row = cur.fetchone()
                record = None if row is None else self._record(row[0], float(row[1]))
                if record is None or (expected is not None and not holds(record.data, expected)):
                    return False
                expires = record.expires if expires is None else expires
                cur.execute(self._sql_rewrite, self._rewrite_params(key, merged(record.data, changes), expires))
                return True
            finally:
                cur.execute("COMMIT")

    def replace(self, key: str, expected: Mapping[str, str], new: Mapping[str, str]) -> bool:
        """The row read, compared and written back in one transaction (a rare maintenance write)."""
        with self._cursor() as cur:
            return self._rewrite(cur, key, Changes(new), None, expected)

    def _document(self, data: Mapping[str, str], expires: float) -> str:
        """The stored form of a session's JSON-encoded values."""
        return json_object(data)

    def _record(self, raw: Any, expires: float) -> Record | None:
        """A stored document read back, or None (logged) when it is malformed."""
        return decode_record(raw, expires, f"table {self.table}")

    def _execute(self, cur: Any, sql: str, params: tuple[Any, ...]) -> None:
        """Run one of the statements a request runs, on its own (autocommit)."""
        cur.execute(sql, params)

    def _batch(self, cur: Any) -> contextlib.AbstractContextManager[None]:
        """Send the statements run inside in as few round trips as their reads allow (a pipeline)."""
        return contextlib.nullcontext()

    def _cursor_on(self, conn: Any) -> contextlib.AbstractContextManager[Any]:
        """A cursor on ``conn`` for one operation."""
        return contextlib.closing(conn.cursor())

    def _new_pool(self) -> Connections:
        """This process's pool of connections."""
        return Pool(self._connect, self._pool_size, self._timeout)

    # -- the store contract ------------------------------------------------------------

    def load(self, key: str) -> Record | None:
        try:
            row = self._load_row(key)
        except ConnectionLost:  # a pooled connection the server had closed (a restart): a read is safe to repeat
            row = self._load_row(key)
        if row is None or row[1] <= now():
            return None
        return self._record(row[0], float(row[1]))

    def _load_row(self, key: str) -> Any:
        with self._cursor() as cur:
            self._execute(cur, self._sql_load, (key,))
            return cur.fetchone()

    def create(self, key: str, data: Mapping[str, str], ttl: float) -> None:
        with self._cursor() as cur:
            expires = now() + ttl
            self._execute(cur, self._sql_create, self._create_params(key, data, expires))

    def update(self, key: str, changes: Changes, ttl: float) -> bool:
        with self._cursor() as cur:
            return self._merge(cur, key, changes, now() + ttl)

    def add(self, key: str, data: Mapping[str, str], expires: float) -> bool:
        with self._cursor() as cur:
            self._execute(cur, self._sql_add, (*self._create_params(key, data, expires), now()))
            return bool(cur.rowcount)

    def add_many(self, sessions: Sequence[Copy]) -> int:
        """add's statement for each session, in one transaction (:attr:`rewrite_begin`): SQLite runs them
        in-process, so each costs no round trip, and the batch one commit."""
        if not sessions:
            return 0
        t = now()
        with self._cursor() as cur:
            cur.execute(self.rewrite_begin)
            try:
                cur.executemany(self._sql_add, [(*self._create_params(*session), t) for session in sessions])
                return int(cur.rowcount)
            finally:
                cur.execute("COMMIT")

    def scan(self, batch: int = 1000) -> Iterator[list[tuple[str, Record]]]:
        """One SELECT per batch, the rows after the last key seen, on a connection held for that SELECT only."""
        last = ""  # below every key but the empty one, which no store gives
        while True:
            rows = self._rows(self._sql_scan, (last, batch))
            t = now()
            found = [(key, record) for key, raw, expires in rows
                     if float(expires) > t and (record := self._record(raw, float(expires))) is not None]  # fmt: skip
            if found:
                yield found
            if len(rows) < batch:
                return
            last = rows[-1][0]

    def count(self) -> int:
        """One SELECT count(*) of the live rows."""
        return int(self._rows(self._sql_count, (now(),))[0][0])

    def touch(self, key: str, ttl: float) -> bool:
        t = now()
        with self._cursor() as cur:
            self._execute(cur, self._sql_touch, (t + ttl, key, t))
            return bool(cur.rowcount)

    def delete(self, key: str) -> None:
        with self._cursor() as cur:
            self._execute(cur, self._sql_delete, (key,))

    def user_sessions(self, user: str) -> list[UserRecord]:
        """One SELECT through the index of bound users."""
        found, t = [], now()
        for key, text, expires in self._rows(self._sql_user_sessions, (user,)):
            binding = json_value(text)
            if float(expires) > t and bound_user({USER_KEY: binding}) == user:
                found.append(UserRecord(key, binding, float(expires)))
        return found

    def _rows(self, sql: str, params: tuple[Any, ...]) -> list[Any]:
        """What a read returns; asked again once on a connection the server had closed, as :meth:`load` is."""
        try:
            return self._fetch(sql, params)
        except ConnectionLost:
            return self._fetch(sql, params)

    def _fetch(self, sql: str, params: tuple[Any, ...]) -> list[Any]:
        with self._cursor() as cur:
            cur.execute(sql, params)
            return list(cur.fetchall())

    def trim_user(self, user: str, limit: int, keep: str | None = None) -> list[str]:
        """A SELECT of the rows beyond the ``limit`` most recently used and a DELETE of them, in one
        transaction (:attr:`rewrite_begin`)."""
        with self._cursor() as cur:
            cur.execute(self.rewrite_begin)
            try:
                cur.execute(self._sql_beyond, (user, now(), keep, limit))
                keys = [key for (key,) in cur.fetchall()]
                self._delete_keys(cur, keys)
            finally:
                cur.execute("COMMIT")
        return keys

    def delete_many(self, keys: Sequence[str]) -> None:
        """One DELETE (one per 500 keys)."""
        if keys:
            with self._cursor() as cur:
                self._delete_keys(cur, list(keys))

    def _delete_keys(self, cur: Any, keys: list[str]) -> None:
        for start in range(0, len(keys), DELETE_BATCH):
            batch = keys[start : start + DELETE_BATCH]
            listed = ", ".join([self.param] * len(batch))
            cur.execute(f"DELETE FROM {self.table} WHERE {self.columns[0]} IN ({listed})", tuple(batch))

    def ping(self) -> None:
        with self._cursor() as cur:
            cur.execute("SELECT 1")
            cur.fetchone()

    def mark_stale(self, key: str) -> None:
        with self._cursor() as cur:
            cur.execute(self._sql_mark, (key,))

    def stale(self, limit: int) -> list[tuple[int, str]]:
        with self._cursor() as cur:
            cur.execute(self._sql_stale, (limit,))
            return [(int(mark), key) for mark, key in cur.fetchall()]

    def unmark_stale(self, marks: Sequence[int]) -> None:
        if marks:
            with self._cursor() as cur:
                listed = ", ".join([self.param] * len(marks))
                cur.execute(f"DELETE FROM {self.stale_table} WHERE mark IN ({listed})", tuple(marks))

    def count_stale(self) -> int:
        with self._cursor() as cur:
            cur.execute(f"SELECT count(*) FROM {self.stale_table}")
            return int(cur.fetchone()[0])

    def cleanup(self) -> int:
        """Delete expired rows in batches of 1000, one statement each: several processes' cleaners
        each take rows no other is deleting (:attr:`skip_locked`)."""
        removed = 0
        while True:
            with self._cursor() as cur:
                cur.execute(self._sql_cleanup, (now(),))
                count: int = max(cur.rowcount, 0)
            removed += count
            if count < CLEANUP_BATCH or self._cleaner.stopped:
                break
        if removed:
            log.info("Cleaned up %d expired sessions", removed)
        return removed

    def setup(self) -> None:
        """Create the table and its index if missing (safe when several processes start at once).

        It uses a connection of its own, not the pool: a process that only builds the store
        (a gunicorn master with ``--preload``) keeps no connection and starts no thread.
        """
        with self._cursor(pooled=False) as cur, self._batch(cur):
            for statement in self._create_statements():
                cur.execute(statement)

    def _create_statements(self) -> list[str]:
        """What :meth:`setup` runs: the schema, and whatever makes it safe to run at once."""
        return self.schema()

    def close(self) -> None:
        self._cleaner.stop()
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.close()

    # -- connections and the cleanup thread --------------------------------------------

    @contextlib.contextmanager
    def _cursor(self, pooled: bool = True) -> Iterator[Any]:
        """A cursor on a pooled connection (``pooled=False``: on a connection of its own, closed
        after). A connection that saw an error is closed; driver errors become :class:`StoreError`."""
        pool = (self._pool or self._start()) if pooled else None
        lost = False
        try:
            conn = pool.acquire() if pool is not None else self._connect()
            try:
                with self._cursor_on(conn) as cur:
                    yield cur
            except BaseException:
                if pool is not None:
                    pool.discard(conn)
                    if getattr(conn, "closed", False):  # the server went away: the idle ones went with it
                        pool.close_idle()
                        lost = True
                else:
                    close_quietly(conn)
                raise
            if pool is not None:
                pool.release(conn)
            else:
                conn.close()
        except self.errors as exc:
            error = ConnectionLost if lost else StoreError
            raise error(f"{type(self).__name__}: {exc}".strip()) from exc

    def _start(self) -> Connections:
        """Make this process's pool and start its cleanup thread: on first use, so after a fork."""
        with self._lock:
            if self._cleaner.stopped:
                raise StoreError(f"{type(self).__name__} is closed")
            if self._pool is None:
                self._pool = self._new_pool()
                self._cleaner.start()
            return self._pool

    def _clean(self) -> None:
        try:
            self.cleanup()
        except StoreError as exc:
            log.warning("Session cleanup failed: %s", exc)

    def _after_fork(self) -> None:
        # A new lock (a parent's thread may have held it), and no connection of the parent's.
        self._lock = threading.Lock()
        if self._pool is not None:
            self._pool.forget()
        self._pool = None
