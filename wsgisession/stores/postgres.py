"""Sessions in PostgreSQL over psycopg2: plain SQL, a per-process pool, one statement per write."""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

import psycopg2
import psycopg2.errors
import psycopg2.extensions
import psycopg2.extras

from .base import USER_KEY, Changes, Copy, json_object, log, now
from .sql import SQLStore


class PostgresStore(SQLStore):
    """Sessions in a PostgreSQL table ``(id text, data jsonb, expires_at timestamptz)``."""

    name = "PostgreSQL"

    param = "%s"
    data_type = "JSONB"
    time_type = "TIMESTAMPTZ"
    mark_type = "BIGSERIAL"
    nulls_last = " NULLS LAST"
    rewrite_lock = " FOR UPDATE"
    errors = (psycopg2.Error,)

    def __init__(
        self,
        dsn: str,
        *,
        table: str = "wsgisession",
        cleanup_interval: float = 120,
        pool_size: int = 8,
        timeout: float = 3.0,
        create_table: bool = True,
        prepare: bool = True,
    ) -> None:
        """``prepare=False``: never prepare statements (for a pooler that pins the connection of a
        client that does, such as RDS Proxy)."""
        self.dsn = dsn
        super().__init__(table, cleanup_interval, pool_size, timeout)
        self._lock_id = int.from_bytes(hashlib.sha256(f"wsgisession:{table}".encode()).digest()[:8], "big", signed=True)
        self._sql_merge = self._merge_sql()
        self._sql_add_many = self._copy_sql(self._upsert(self._copied_rows()))
        # ANY(ARRAY(...)): the keys are found first, then deleted through the primary key. With IN (...),
        # PostgreSQL may join the subquery to a scan of the whole table instead: it cannot estimate how
        # many sessions one user has (a partial index's expression has no statistics).
        i = self.columns[0]
        self._sql_trim_user = f"DELETE FROM {self.table} WHERE {i} = ANY(ARRAY({self._sql_beyond})) RETURNING {i}"
        # The statements each request runs, prepared once per connection: the server then
        # parses and plans them once, not on every call (about a fifth of a read's time); and the adds
        # that copy sessions in, which a migration repeats.
        statements = (self._sql_load, self._sql_create, self._sql_touch, self._sql_delete, self._sql_merge,
                      self._sql_add, self._sql_add_many)  # fmt: skip
        self._prepared = {sql: _prepared(sql) for sql in statements} if prepare else {}
        if create_table:
            self.setup()

    @staticmethod
    def timestamp(param: str) -> str:
        return f"to_timestamp({param})"

    @staticmethod
    def epoch(column: str) -> str:
        return f"date_part('epoch', {column})"

    def binding(self, column: str) -> str:
        return f"({column} -> '{USER_KEY}')"

    def bound_id(self, column: str) -> str:
        return f"({self.binding(column)} ->> 'id')"

    def binding_field(self, column: str, field: str) -> str:
        return f"({self.binding(column)} -> '{field}')"  # jsonb: numbers compare as numbers

    def _create_statements(self) -> list[str]:
        # Concurrent CREATE TABLE IF NOT EXISTS can collide; a transaction lock serialises them.
        return ["BEGIN", f"SELECT pg_advisory_xact_lock({self._lock_id})", *self.schema(), "COMMIT"]

    def _connect(self) -> Any:
        conn = psycopg2.connect(
            self.dsn,
            connect_timeout=max(1, round(self._timeout)),
            application_name="wsgisession",
            connection_factory=_Connection,
        )
        conn.autocommit = True
        # JSON columns come back as text, decoded by the store, which copes with malformed records.
        psycopg2.extras.register_default_json(conn, loads=_text)
        psycopg2.extras.register_default_jsonb(conn, loads=_text)
        return conn

    def add_many(self, sessions: Sequence[Copy]) -> int:
        """One statement for the batch, its values in one array per column (so its text, prepared, is the
        same whatever the batch): its rowcount counts the rows inserted or replaced, the copies stored."""
        if not sessions:
            return 0
        columns = zip(*(self._create_params(*session) for session in _distinct(sessions)), strict=True)
        with self._cursor() as cur:
            self._execute(cur, self._sql_add_many, (*map(list, columns), now()))
            return int(cur.rowcount)

    def _copied_rows(self) -> str:
        """add_many's rows: a SELECT from one array for each of :meth:`_create_params`' values."""
        return "SELECT k, d::jsonb, to_timestamp(e) FROM unnest(%s::text[], %s::text[], %s::float8[]) AS rows(k, d, e)"

    def trim_user(self, user: str, limit: int, keep: str | None = None) -> list[str]:
        """One statement: DELETE ... RETURNING."""
        with self._cursor() as cur:
            cur.execute(self._sql_trim_user, (user, now(), keep, limit))
            return [key for (key,) in cur.fetchall()]

    def _merge_sql(self) -> str:
        """One statement that merges per-key changes into a live row (jsonb operators)."""
        return (
            f"UPDATE {self.table} SET data = (data - %s::text[]) || %s::jsonb, expires_at = to_timestamp(%s) "
            "WHERE id = %s AND expires_at > to_timestamp(%s)"
        )

    def _merge_params(self, key: str, changes: Changes, expires: float) -> tuple[Any, ...]:
        return (list(changes.deleted), json_object(changes.set), expires, key, now())

    def _merge(self, cur: Any, key: str, changes: Changes, expires: float) -> bool:
        self._execute(cur, self._sql_merge, self._merge_params(key, changes, expires))
        return bool(cur.rowcount)

    def _execute(self, cur: Any, sql: str, params: tuple[Any, ...]) -> None:
        """Run ``sql`` as the statement prepared on this connection (prepared in the same round
        trip on first use).

        Behind a pooler that hands each transaction to any server connection (PgBouncer in
        transaction mode), a statement is not prepared where the next call runs: the first
        sign of that makes this store run its statements unprepared from then on. A statement
        that ALTER TABLE outdated is prepared anew on that connection.
        """
        statement = self._prepared.get(sql)
        if statement is None:
            cur.execute(sql, params)
            return
        known = cur.connection.prepared
        try:
            if statement.name in known:
                cur.execute(statement.execute, params)
                return
            try:
                cur.execute(f"{statement.prepare}; {statement.execute}", params)
            except psycopg2.errors.DuplicatePreparedStatement:  # by a call whose EXECUTE failed
                known.add(statement.name)
                cur.execute(statement.execute, params)
            known.add(statement.name)
        except psycopg2.errors.InvalidSqlStatementName as exc:
            if self._prepared:
                self._prepared = {}
                log.info("PostgreSQL: statements are no longer prepared (%s)", str(exc).strip())
            cur.execute(sql, params)
        except psycopg2.errors.FeatureNotSupported:  # "cached plan must not change result type"
            known.discard(statement.name)
            with contextlib.suppress(psycopg2.errors.InvalidSqlStatementName):
                cur.execute(f"DEALLOCATE {statement.name}")
            cur.execute(sql, params)

    def _claim_cleanup(self, cur: Any) -> bool:
        # A transaction-level lock: held only for one batch, and valid behind PgBouncer.
        cur.execute("SELECT pg_try_advisory_xact_lock(%s)", (self._lock_id,))
        return bool(cur.fetchone()[0])


def _text(value: str) -> str:
    return value


def _distinct(sessions: Sequence[Copy]) -> Iterable[Copy]:
    """The first session of each key (adding the next would find it live): one upsert may change a row
    once only, and a Redis SCAN may give a key twice."""
    first: dict[str, Copy] = {}
    for session in sessions:
        first.setdefault(session[0], session)
    return first.values()


class _Connection(psycopg2.extensions.connection):  # type: ignore[misc]
    """A psycopg2 connection that remembers the names of the statements prepared on it."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.prepared: set[str] = set()


class _Prepared(NamedTuple):
    """A statement as this store prepares it: its name, its PREPARE and its EXECUTE."""

    name: str
    prepare: str
    execute: str


def _prepared(sql: str) -> _Prepared:
    """``PREPARE`` and ``EXECUTE`` for ``sql`` (``%s`` parameters), named after its text: two
    different statements never share a name, even on a server connection a pooler shares."""
    name = "wsgisession_" + hashlib.sha256(sql.encode()).hexdigest()[:20]
    first, *rest = sql.split("%s")
    body = first + "".join(f"${number}{part}" for number, part in enumerate(rest, 1))
    return _Prepared(name, f"PREPARE {name} AS {body}", f"EXECUTE {name} ({', '.join(['%s'] * len(rest))})")
